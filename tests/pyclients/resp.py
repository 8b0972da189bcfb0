"""A tiny blocking RESP2 client (stdlib only) for the Redis tests; its reader also reads
the RESP3 types (after HELLO 3): a map as ("map", [[k, v], ...]), a set as ("set", [...]),
a push as ("push", [...]), null as None, a double as ("double", text), a boolean as
True/False, a big number as int, a verbatim string as bytes, a blob error as RespError;
an attribute is read and dropped.

  r = Resp(port=6379)                  # or Resp(unix="/path/redis.sock"), password=..., db=N
  r.cmd("SET", "k", b"v", "PX", 1000)  # -> "OK"
  r.cmd("GET", "k")                    # -> b"v" (bulk strings stay bytes), None if absent
  r.scan("httpshim:*")                 # -> every matching key (bytes), SCAN to cursor 0

Every call opens its own connection (a restarted or killed server never leaves a stale
one behind) unless used as a context manager, which keeps one connection for the block.
A `-ERR` reply raises RespError; a server that does not answer within `timeout` raises
socket.timeout.
"""
import socket


class RespError(Exception):
    pass


def command(*args):
    return encode(args)


def raw_replies(sock, n):
    """n whole replies (simple, error, integer or bulk) as the server sent them, as text;
    what came, then <closed> or <timeout>, when they do not all come."""
    def whole(b):
        k, i = 0, 0
        while k < n:
            j = b.find(b"\r\n", i)
            if j < 0:
                return False
            if b[i:i + 1] == b"$" and int(b[i + 1:j]) >= 0:
                j = j + 2 + int(b[i + 1:j])
                if len(b) < j + 2:
                    return False
            i, k = j + 2, k + 1
        return True
    got = b""
    try:
        while not whole(got):
            d = sock.recv(4096)
            if not d:
                return got.decode() + "<closed>"
            got += d
    except socket.timeout:
        return got.decode() + "<timeout>"
    return got.decode()


def read_to_end(sock):
    """Every byte until the connection ends (or fails: what came before it)."""
    got = bytearray()
    try:
        while True:
            d = sock.recv(1 << 20)
            if not d:
                break
            got += d
    except OSError:
        pass
    return bytes(got)


def until_closed(sock):
    """What comes (4 KB at most) until the connection ends, then <closed>, or <open> when
    it stays quiet for the socket's timeout."""
    got = b""
    try:
        while len(got) < 4096:
            d = sock.recv(4096)
            if not d:
                return got.decode() + "<closed>"
            got += d
    except socket.timeout:
        pass
    return got.decode() + "<open>"


def encode(args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, bytes):
            b = a
        elif isinstance(a, str):
            b = a.encode("utf-8")
        else:
            b = str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Reader(object):
    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("redis closed the connection")
        self.buf += data

    def line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        ln, self.buf = self.buf.split(b"\r\n", 1)
        return ln

    def exact(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def reply(self):
        ln = self.line()
        t, rest = ln[:1], ln[1:]
        if t == b"+":
            return rest.decode("latin-1")
        if t == b"-":
            return RespError(rest.decode("latin-1"))
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            return None if n < 0 else self.exact(n)
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self.reply() for _ in range(n)]
        if t == b"_":
            return None
        if t == b"#":
            return rest == b"t"
        if t == b",":
            return ("double", rest.decode("latin-1"))
        if t == b"(":
            return int(rest)
        if t == b"=":
            return self.exact(int(rest))
        if t == b"!":
            return RespError(self.exact(int(rest)).decode("latin-1"))
        if t in (b"~", b">"):
            return ("set" if t == b"~" else "push", [self.reply() for _ in range(int(rest))])
        if t == b"%":
            return ("map", [[self.reply(), self.reply()] for _ in range(int(rest))])
        if t == b"|":
            for _ in range(2 * int(rest)):
                self.reply()
            return self.reply()
        raise ConnectionError("not RESP: %r" % ln[:100])


class Resp(object):
    def __init__(self, port=None, host="127.0.0.1", unix=None, password=None, db=0,
                 timeout=5.0):
        self.port, self.host, self.unix = port, host, unix
        self.password, self.db, self.timeout = password, db, timeout
        self._conn = None

    def _connect(self):
        if self.unix:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            addr = self.unix
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            addr = (self.host, self.port)
        s.settimeout(self.timeout)
        try:
            s.connect(addr)
            rd = _Reader(s)
            pre = []
            if self.password is not None:
                pre.append(("AUTH", self.password))
            if self.db:
                pre.append(("SELECT", self.db))
            for args in pre:
                s.sendall(encode(args))
                r = rd.reply()
                if isinstance(r, RespError):
                    raise r
        except BaseException:
            s.close()
            raise
        return s, rd

    def __enter__(self):
        self._conn = self._connect()
        return self

    def __exit__(self, *exc):
        self._conn[0].close()
        self._conn = None

    def pipeline(self, *cmds):
        """Sends every command in one write, returns the replies (errors as RespError
        objects, not raised)."""
        own = self._conn is None
        s, rd = self._conn or self._connect()
        try:
            s.sendall(b"".join(encode(c) for c in cmds))
            return [rd.reply() for _ in cmds]
        finally:
            if own:
                s.close()

    def cmd(self, *args):
        r = self.pipeline(args)[0]
        if isinstance(r, RespError):
            raise r
        return r

    def ping(self):
        try:
            return self.cmd("PING") == "PONG"
        except (OSError, ConnectionError, RespError):
            return False

    def scan(self, match, limit=10000):
        """Every key matching the Redis glob `match` (bytes), bounded to `limit` rounds."""
        keys, cursor = [], b"0"
        own = self._conn is None
        if own:
            self.__enter__()
        try:
            for _ in range(limit):
                cursor, batch = self.cmd("SCAN", cursor, "MATCH", match, "COUNT", 1000)
                keys += batch
                if cursor == b"0":
                    return sorted(set(keys))
        finally:
            if own:
                self.__exit__()
        raise AssertionError("SCAN did not finish in %d rounds" % limit)
