"""closeget.py — one request on a connected socket, its answer read to EOF (at most 1 MiB)
and the socket closed: for test clients that check who answered, not how."""


def close_read(s):
    """Reads to EOF and closes; (status line, body) as text."""
    data = b""
    while len(data) < 1 << 20:
        d = s.recv(65536)
        if not d:
            break
        data += d
    s.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n", 1)[0].decode("latin-1"), body.decode("latin-1")


def close_exchange(s, request):
    """Sends request (bytes), reads to EOF; (status line, body) as text."""
    s.sendall(request)
    return close_read(s)


def close_get(s, target, host="x"):
    """GET target with Connection: close."""
    return close_exchange(s, b"GET %s HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n"
                          % (target.encode(), host.encode()))
