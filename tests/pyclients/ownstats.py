"""ownstats.py — what a shimmed test client knows of its own process: its /stats document,
read from the stats socket whose pattern (stats_socket, %p for the pid) it was given."""
import json
import os
import socket


def own_stats(pattern):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(pattern.replace("%p", str(os.getpid())))
    s.sendall(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        data += b
    s.close()
    return json.loads(data.partition(b"\r\n\r\n")[2])
