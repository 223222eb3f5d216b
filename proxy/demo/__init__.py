"""The demo: a single-node proxy in front of demo instances (`edgeproxy demo`)."""
