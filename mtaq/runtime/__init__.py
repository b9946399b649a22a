"""The process runtime of the command line: the embedded redis-server, the supervisor that starts,
restarts and stops the role processes, the lifeline that makes them die with it, and the prefork
ingress (N processes on one socket). Neither the ingress nor the worker imports any of it."""
