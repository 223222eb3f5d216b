"""`python -m proxy.worker`: the master starts each worker so, with its bootstrap on stdin."""

from proxy.worker.worker import main

main()
