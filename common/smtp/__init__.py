"""The SMTP both sides speak: one ``Reply`` (reply.py), one ``[host]:port`` parser (hostport.py)
and the sans-IO client (client.py). The ingress's reply catalogue, the workers' deliveries and the
ingress's recipient verification all use these, so the protocol is written once. Nothing here
does IO or imports ingress/, worker/ or mtaq/."""
