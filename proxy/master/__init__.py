"""The control plane: the master process (workers, listeners, reloads, control, admin).

It starts workers as processes and reads their stats blocks; it never imports
proxy.worker (checked by the import contract in setup.cfg).
"""
