-- wrk script for bench/allocator.py's soak: a request mix that makes the proxy
-- allocate buffers of every size. In a cycle of 8 requests per connection:
-- 3 GET /small, 2 GET /64k, 1 POST /small with a 4 KiB body, 1 POST /small
-- with a 64 KiB body, and 1 GET /64k with `Connection: close` (the server
-- closes, wrk opens a new connection: accept and connection setup churn).
-- The REPORT line comes from report.lua (loaded from this script's directory).
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
dofile(here .. "report.lua")

local host = { ["Host"] = "bench.test" }
local close = { ["Host"] = "bench.test", ["Connection"] = "close" }
local body4k = string.rep("a", 4096)
local body64k = string.rep("b", 65536)
local reqs = {}

init = function(args)
  reqs = {
    wrk.format("GET", "/small", host),
    wrk.format("GET", "/64k", host),
    wrk.format("GET", "/small", host),
    wrk.format("POST", "/small", host, body4k),
    wrk.format("GET", "/small", host),
    wrk.format("GET", "/64k", host),
    wrk.format("POST", "/small", host, body64k),
    wrk.format("GET", "/64k", close),
  }
end

local n = 0
request = function()
  n = n + 1
  return reqs[(n % #reqs) + 1]
end
