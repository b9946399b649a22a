"""The process runtime of the command line: the embedded redis-server, the supervisor that starts,
restarts and stops the role processes, and the prefork ingress (N processes on one socket)."""
