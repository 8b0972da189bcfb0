"""Large answers on kept-alive connections, each with a writer thread and a reader thread
(tests/test_pool.py::test_large_answers_on_busy_kept_alive_connections_arrive_whole).
usage: bigpipe.py PORT CONNS REQS WINDOW CACHEABLE_PCT SEED
Each connection sends REQS GETs of /custom/c (a rule caches it) or /custom/u (none does),
each with a tag of its own and a 100-400 KB body, up to WINDOW of them unanswered at once
(pipelined), and reads the answers as they come: each must be whole, in order and its own
(status, X-Tag, Content-Length and as many body bytes); 5 s without a byte is a stall.
Prints one JSON line: {"ok": answers read whole, "failure": null or what went wrong}."""
import json, random, socket, sys, threading, os

port, conns, reqs, window, cpct, seed = (int(a) for a in sys.argv[1:7])
failure, ok = [], [0]
lock = threading.Lock()

def one(ci):
    rnd = random.Random(seed * 1000 + ci)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.settimeout(5)
    sem = threading.Semaphore(window)
    sent = []
    cv = threading.Condition()
    def writer():
        for i in range(reqs):
            n = rnd.randrange(100000, 400000)
            tag = "%d-%d-%d-%d" % (os.getpid(), seed, ci, i)
            cache = rnd.randrange(100) < cpct
            target = "/custom/%s?tag=%s&n=%d" % ("c" if cache else "u", tag, n)
            sem.acquire()
            with cv:
                sent.append((tag, n))
                cv.notify()
            try:
                s.sendall(("GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target).encode())
            except OSError as e:
                with lock:
                    failure.append("send: %r" % e)
                return
    w = threading.Thread(target=writer, daemon=True)
    w.start()
    buf = b""
    try:
        for i in range(reqs):
            with cv:
                while len(sent) <= i:
                    cv.wait(5)
                tag, n = sent[i]
            while b"\r\n\r\n" not in buf:
                d = s.recv(65536)
                if not d:
                    raise EOFError("EOF before the head of %s" % tag)
                buf += d
            head, _, buf = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            hd = {k.strip().lower(): v.strip() for k, _, v in (l.partition(":") for l in lines[1:])}
            if not lines[0].startswith("HTTP/1.1 200") or hd.get("x-tag") != tag or int(hd.get("content-length", -1)) != n:
                raise ValueError("wrong answer for %s: %r" % (tag, head[:300]))
            while len(buf) < n:
                d = s.recv(1 << 20)
                if not d:
                    raise EOFError("EOF in the body of %s (%d of %d)" % (tag, len(buf), n))
                buf += d
            sem.release()
            with lock:
                ok[0] += 1
            buf = buf[n:]
    except (OSError, EOFError, ValueError) as e:
        with lock:
            failure.append("conn %d: %s" % (ci, e))
    s.close()

ts = [threading.Thread(target=one, args=(i,)) for i in range(conns)]
for t in ts: t.start()
for t in ts: t.join(60)
print(json.dumps({"ok": ok[0], "failure": failure[0] if failure else None}))
