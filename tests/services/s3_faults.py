#!/usr/bin/env python3
"""s3_faults.py - moto's S3 server behind a WSGI middleware that injects
latency and faults, for tests. The project's copy of the team's
shared/services/s3_faults.py (a clone has no ../shared); tests/services/s3_server.py
starts it. It is a script, not a module (it writes only under --state-dir).

  python s3_faults.py serve --state-dir DIR [--port N]   (s3_server.py does this)
  python s3_faults.py set DIR KEY=VALUE ...   merge keys into DIR/faults.json
  python s3_faults.py set DIR --reset         back to the defaults
  python s3_faults.py show DIR                print DIR/faults.json

serve: werkzeug make_server("127.0.0.1", N, app, threaded=True), N=0 picks a
free port; once it listens, DIR/server.env gets S3_PORT=N (atomically). moto
keeps every bucket in memory: a restart starts empty, and so does faults.json
(rewritten with the defaults). Large objects spill to DIR/tmp (TMPDIR).

DIR/faults.json is re-read on every request (a ~150-byte file): missing means
no faults; content that does not parse is retried for 10 ms (a writer that
truncates first), then means no faults (logged once in s3.log). Keys, with
their defaults in FAULT_DEFAULTS:
  latency_ms, jitter_ms  sleep latency_ms +/- uniform(jitter_ms) (at least 0)
                         before the request is served: a slower first byte
  fail_next, fail_status the next fail_next requests get fail_status with an
                         S3 XML error body (503 SlowDown, 500 InternalError,
                         404 NoSuchKey, 403 AccessDenied, ...; fail_code
                         overrides the code); moto never sees them
  fail_rate              0..1: in addition, each request fails with that
                         probability (not counted down)
  truncate_next          the next N GETs answered 200/206 with >= 2 bytes send
                         the headers (Content-Length = full size) and the
                         first half of the body, then close the connection
  drop_next              the next N requests: the connection is closed
                         without any response (the client sees EOF)
  only_get               true: latency and faults apply to GET requests only
                         (ListObjects is a GET too; HEAD is not)
  methods                list of methods to apply to instead, e.g. ["GET","PUT"]
  path_contains          apply only where the raw path contains this string
One request takes at most one counter, in the order drop, fail, truncate.
Counters are decremented under a lock (threading + flock on DIR/.faults.lock)
and written back with os.replace, so a test can read what is left. Writers
from outside: hold the same flock, write a temp file, os.replace it (as `set`
and the README's set_faults do); a plain open("w") can lose against a
counter being written back at that moment.

DIR/requests.log gets one tab-separated line per request (not for
/_s3_faults/*): unix_time method raw_path range status bytes_sent ms fault,
with "-" for no range or no fault; status 0 = dropped. The line is written
before the last byte of the response is sent, so once a client has a
response its line is there; ms = arrival to that point (latency included).
Reset it with open(path, "w").close(). GET /_s3_faults/health answers JSON
(no latency, no faults, not logged): s3_server.py waits for it.
"""
import argparse
import errno
import fcntl
import json
import logging
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid

FAULT_DEFAULTS = {
    "latency_ms": 0,
    "jitter_ms": 0,
    "fail_next": 0,
    "fail_status": 503,
    "fail_rate": 0.0,
    "truncate_next": 0,
    "drop_next": 0,
    "only_get": False,
}
COUNTERS = ("drop_next", "fail_next", "truncate_next")
log = logging.getLogger("s3_faults")

ERROR_CODES = {  # status -> (S3 error code, message)
    400: ("BadRequest", "An error occurred when parsing the HTTP request."),
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
    409: ("OperationAborted", "A conflicting conditional operation is currently in progress against this resource. Please try again."),
    429: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented."),
    503: ("SlowDown", "Please reduce your request rate."),
}
REASONS = {400: "Bad Request", 403: "Forbidden", 404: "Not Found", 409: "Conflict",
           429: "Too Many Requests", 500: "Internal Server Error",
           501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
           504: "Gateway Timeout"}


def write_json_atomic(path, data):
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".faults.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.write("\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class FaultFile:
    """faults.json, read on every request; counters taken under a lock."""

    def __init__(self, path):
        self.path = path
        self.lock_path = os.path.join(os.path.dirname(path), ".faults.lock")
        self.lock = threading.Lock()
        self.bad = None  # the last content that did not parse

    def read(self):
        """The faults as a dict; {} if the file is missing or not a JSON object."""
        text = ""
        for _ in range(5):
            try:
                with open(self.path) as f:
                    text = f.read()
            except FileNotFoundError:
                return {}
            try:
                cfg = json.loads(text)
                if isinstance(cfg, dict):
                    return cfg
            except ValueError:
                pass
            if text == self.bad:
                return {}  # known bad: don't wait for it again on every request
            time.sleep(0.002)  # maybe a writer that truncates first: retry briefly
        self.bad = text
        log.warning("ignoring unparsable %s (no faults until it parses): %r", self.path, text[:200])
        return {}

    def take(self, key):
        """Decrement counter `key` if it is > 0; True if one was taken."""
        with self.lock, open(self.lock_path, "a") as lk:
            fcntl.flock(lk, fcntl.LOCK_EX)
            cfg = self.read()
            n = as_int(cfg.get(key, 0))
            if n <= 0:
                return False
            cfg[key] = n - 1
            write_json_atomic(self.path, cfg)
            return True


def as_int(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return 0


def as_float(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return 0.0


def applies(cfg, method, raw_path):
    methods = cfg.get("methods")
    if methods:
        if method not in [str(m).upper() for m in methods]:
            return False
    elif cfg.get("only_get") and method != "GET":
        return False
    sub = cfg.get("path_contains")
    return not sub or str(sub) in raw_path


class FaultMiddleware:
    def __init__(self, app, state_dir, info):
        self.app = app
        self.faults = FaultFile(os.path.join(state_dir, "faults.json"))
        self.log_path = os.path.join(state_dir, "requests.log")
        self.info = info
        self.count = 0
        self.count_lock = threading.Lock()

    # -- request log -------------------------------------------------------
    def log(self, t0, method, raw_path, rng, status, nbytes, fault):
        ms = (time.perf_counter() - t0) * 1000
        line = (f"{time.time():.6f}\t{method}\t{raw_path}\t{rng or '-'}\t{status}\t"
                f"{nbytes}\t{ms:.2f}\t{fault or '-'}\n")
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        finally:
            os.close(fd)

    # -- WSGI --------------------------------------------------------------
    def __call__(self, environ, start_response):
        raw_path = environ.get("REQUEST_URI") or environ.get("RAW_URI") or environ.get("PATH_INFO", "/")
        if environ.get("PATH_INFO", "").startswith("/_s3_faults/"):
            return self.control(environ, start_response)
        t0 = time.perf_counter()
        with self.count_lock:
            self.count += 1
        method = environ.get("REQUEST_METHOD", "GET")
        rng = environ.get("HTTP_RANGE")
        cfg = self.faults.read()
        hit = applies(cfg, method, raw_path)

        if hit:
            delay = as_float(cfg.get("latency_ms", 0))
            jitter = as_float(cfg.get("jitter_ms", 0))
            if jitter > 0:
                delay += random.uniform(-jitter, jitter)
            if delay > 0:
                time.sleep(delay / 1000)

            if as_int(cfg.get("drop_next", 0)) > 0 and self.faults.take("drop_next"):
                return self.drop(environ, start_response, t0, method, raw_path, rng)
            if as_int(cfg.get("fail_next", 0)) > 0 and self.faults.take("fail_next"):
                return self.fail(cfg, environ, start_response, t0, method, raw_path, rng, "fail")
            rate = as_float(cfg.get("fail_rate", 0))
            if rate > 0 and random.random() < rate:
                return self.fail(cfg, environ, start_response, t0, method, raw_path, rng, "fail_rate")
            if method == "GET" and as_int(cfg.get("truncate_next", 0)) > 0:
                return self.maybe_truncate(environ, start_response, t0, method, raw_path, rng)

        return self.passthrough(environ, start_response, t0, method, raw_path, rng)

    def passthrough(self, environ, start_response, t0, method, raw_path, rng):
        seen = {}

        def sr(status, headers, exc_info=None):
            seen["status"] = status
            return start_response(status, headers, exc_info)

        body = self.app(environ, sr)
        return LoggedBody(body, lambda n: self.log(t0, method, raw_path, rng,
                                                   seen.get("status", "0").split(" ")[0], n, None))

    def maybe_truncate(self, environ, start_response, t0, method, raw_path, rng):
        seen = {}

        def sr(status, headers, exc_info=None):
            seen["status"], seen["headers"] = status, list(headers)
            return lambda data: seen.setdefault("written", []).append(data)

        it = self.app(environ, sr)
        try:
            body = b"".join(seen.get("written", [])) + b"".join(it)
        finally:
            if hasattr(it, "close"):
                it.close()
        status = seen["status"]
        code = int(status.split(" ")[0])
        headers = [(k, v) for k, v in seen["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(body))))
        if code in (200, 206) and len(body) >= 2 and self.faults.take("truncate_next"):
            half = body[: len(body) // 2]
            start_response(status, headers)
            self.log(t0, method, raw_path, rng, code, len(half), "truncate")
            return self.truncated(half, environ.get("werkzeug.socket"))
        start_response(status, headers)
        self.log(t0, method, raw_path, rng, code, len(body), None)
        return [body]

    @staticmethod
    def truncated(half, sock):
        yield half
        # the half body is in the kernel's send buffer: end the stream here so
        # the client sees EOF before Content-Length bytes (werkzeug closes the
        # connection anyway; this also holds if it ever keeps it alive)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def fail(self, cfg, environ, start_response, t0, method, raw_path, rng, why):
        code = as_int(cfg.get("fail_status", 503)) or 503
        s3code, message = ERROR_CODES.get(code, ("InjectedFault", "Injected by s3_faults.py"))
        s3code = str(cfg.get("fail_code") or s3code)
        request_id = uuid.uuid4().hex[:16].upper()
        resource = environ.get("PATH_INFO", "/")
        xml = ('<?xml version="1.0" encoding="UTF-8"?>\n'
               f"<Error><Code>{s3code}</Code><Message>{message}</Message>"
               f"<Resource>{escape(resource)}</Resource><RequestId>{request_id}</RequestId>"
               f"<HostId>s3-faults</HostId></Error>").encode()
        body = b"" if method == "HEAD" else xml
        self.drain(environ)
        start_response(f"{code} {REASONS.get(code, 'Error')}",
                       [("Content-Type", "application/xml"), ("Content-Length", str(len(body))),
                        ("x-amz-request-id", request_id), ("x-amz-id-2", "s3-faults")])
        self.log(t0, method, raw_path, rng, code, len(body), why)
        return [body]

    def drop(self, environ, start_response, t0, method, raw_path, rng):
        sock = environ.get("werkzeug.socket")
        self.log(t0, method, raw_path, rng, 0, 0, "drop")
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # FIN: the client reads EOF, no status line
            except OSError:
                pass
        # werkzeug's attempt to send this fails on the closed socket (a
        # ConnectionError it treats as a dropped connection: nothing is sent)
        start_response("500 Dropped", [("Content-Length", "0")])
        return []

    @staticmethod
    def drain(environ):
        """Read a request body we answer without moto (PUT/POST parts)."""
        try:
            n = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            n = 0
        stream = environ.get("wsgi.input")
        while n > 0 and stream is not None:
            chunk = stream.read(min(n, 1 << 20))
            if not chunk:
                break
            n -= len(chunk)

    def control(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if path == "/_s3_faults/health":
            with self.count_lock:
                count = self.count
            body = json.dumps({**self.info, "ok": True, "requests": count,
                               "faults": self.faults.read()}).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(body)))])
            return [body]
        start_response("404 Not Found", [("Content-Length", "0")])
        return []


def escape(s):
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


class LoggedBody:
    """Pass the app's body through and log it (bytes counted) just before its
    last chunk is handed to werkzeug: a client that has the whole response
    always finds its line in requests.log (werkzeug calls close() only after
    waiting up to 10 ms for the client to hang up)."""

    def __init__(self, body, on_done):
        self.body, self.on_done, self.n, self.done = body, on_done, 0, False

    def finish(self):
        if not self.done:
            self.done = True
            self.on_done(self.n)

    def __iter__(self):
        prev = None
        for chunk in self.body:  # one chunk late, to know which is the last
            if prev is not None:
                self.n += len(prev)
                yield prev
            prev = chunk
        if prev is not None:
            self.n += len(prev)
        self.finish()
        if prev:
            yield prev

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.finish()  # the client went away mid-body: log what was sent


# --- commands ------------------------------------------------------------------
def cmd_serve(args):
    state = os.path.realpath(args.state_dir)
    os.makedirs(os.path.join(state, "tmp"), exist_ok=True)
    os.environ["TMPDIR"] = os.path.join(state, "tmp")  # moto spools big objects here
    tempfile.tempdir = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request

    t0 = time.monotonic()
    try:
        import flask  # noqa: F401  (moto[server] extras)
        import flask_cors  # noqa: F401
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
        from werkzeug.serving import make_server
        from werkzeug.test import EnvironBuilder
    except ImportError as e:
        log.error("%s; install: %s -m pip install 'moto[s3]==5.2.1' flask flask-cors", e, sys.executable)
        return 3
    import importlib.metadata as md

    moto_app = DomainDispatcherApplication(create_backend_app)
    # build moto's S3 app now (imports moto.s3), not on the first test request
    env = EnvironBuilder(path="/", method="GET").get_environ()
    for _ in moto_app(env, lambda status, headers, exc_info=None: None):
        pass
    info = {"pid": os.getpid(), "state_dir": state, "moto": md.version("moto"),
            "werkzeug": md.version("werkzeug")}
    app = FaultMiddleware(moto_app, state, info)

    fpath = os.path.join(state, "faults.json")
    write_json_atomic(fpath, dict(FAULT_DEFAULTS))  # a (re)start begins without faults

    try:
        server = make_server("127.0.0.1", args.port, app, threaded=True)
    except OSError as e:
        log.error("cannot listen on 127.0.0.1:%s: %s", args.port, e)
        return 4 if e.errno == errno.EADDRINUSE else 5
    port = server.server_port
    info["port"] = port

    def stop(signum, frame):
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tmp = os.path.join(state, ".server.env.tmp")
    with open(tmp, "w") as f:
        f.write(f"S3_PORT={port}\nS3_PID={os.getpid()}\n")
    os.replace(tmp, os.path.join(state, "server.env"))
    log.info("moto %s S3 on http://127.0.0.1:%d (pid %d), ready in %.2f s; faults %s",
             info["moto"], port, os.getpid(), time.monotonic() - t0, fpath)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        log.info("stopped")
    return 0


def parse_value(v):
    try:
        return json.loads(v)
    except ValueError:
        return v  # a bare string, e.g. path_contains=train/


def cmd_set(args):
    path = os.path.join(args.state_dir, "faults.json")
    ff = FaultFile(path)
    with open(ff.lock_path, "a") as lk:
        fcntl.flock(lk, fcntl.LOCK_EX)
        cfg = dict(FAULT_DEFAULTS) if args.reset else ff.read()
        for kv in args.pairs:
            if "=" not in kv:
                print(f"s3_faults.py set: expected KEY=VALUE, got {kv!r}", file=sys.stderr)
                return 2
            k, v = kv.split("=", 1)
            cfg[k] = parse_value(v)
        write_json_atomic(path, cfg)
    print(json.dumps(cfg, sort_keys=True))
    return 0


def cmd_show(args):
    print(json.dumps(FaultFile(os.path.join(args.state_dir, "faults.json")).read(), sort_keys=True))
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--port", type=int, default=0)
    s.set_defaults(func=cmd_serve)
    s = sub.add_parser("set")
    s.add_argument("state_dir")
    s.add_argument("pairs", nargs="*", metavar="KEY=VALUE")
    s.add_argument("--reset", action="store_true", help="start from the defaults")
    s.set_defaults(func=cmd_set)
    s = sub.add_parser("show")
    s.add_argument("state_dir")
    s.set_defaults(func=cmd_show)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
