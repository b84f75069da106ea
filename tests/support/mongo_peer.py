#!/usr/bin/env python3
"""A MongoDB wire-protocol peer for the agent's MongoDB engine tests.

Built on mockupdb (MongoDB's own wire-protocol test server). It keeps the
fsync lock count the way mongod does, answers the handshake, hello,
buildInfo, getCmdLineOpts, fsync and fsyncUnlock, and logs every command it receives, one
JSON document per line, so the test can assert exactly what was sent.

Usage: mongo_peer.py --log FILE [--version V] [--role primary|secondary]
                     [--optime-file FILE] [--fail-fsync MESSAGE] [--initial-locks N]
                     [--db-path DIR]
Prints "PORT <n>" on stdout once it listens; runs until stdin closes.
"""
import argparse
import datetime
import json
import sys
import threading

from bson import Timestamp, json_util
from mockupdb import MockupDB


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--log", required=True)
    p.add_argument("--version", default="7.0.14")
    p.add_argument("--role", default="primary", choices=["primary", "secondary"])
    p.add_argument("--optime-file", help="JSON [seconds, increment, term]; re-read on every hello")
    p.add_argument("--fail-fsync", help="answer {fsync, lock} with this error")
    p.add_argument("--initial-locks", type=int, default=0, help="locks someone else already holds")
    p.add_argument("--db-path", default="/srv/mongodb", help="storage.dbPath in getCmdLineOpts")
    args = p.parse_args()

    state = {"lock_count": args.initial_locks}
    lock = threading.Lock()
    log = open(args.log, "a", buffering=1)

    def optime():
        seconds, increment, term = 1700000000, 1, 1
        if args.optime_file:
            try:
                with open(args.optime_file) as f:
                    seconds, increment, term = json.load(f)
            except (OSError, ValueError):
                pass
        return {"ts": Timestamp(seconds, increment), "t": term}

    def hello_doc():
        primary = args.role == "primary"
        return {
            "ismaster": primary,
            "isWritablePrimary": primary,
            "secondary": not primary,
            "setName": "rs0",
            "hosts": ["127.0.0.1:27017"],
            "primary": "db-0.example:27017",
            "helloOk": True,
            "maxWireVersion": 21,
            "minWireVersion": 0,
            "maxBsonObjectSize": 16777216,
            "maxMessageSizeBytes": 48000000,
            "maxWriteBatchSize": 100000,
            "localTime": datetime.datetime.now(tz=datetime.timezone.utc),
            "logicalSessionTimeoutMinutes": 30,
            "connectionId": 1,
            "lastWrite": {
                "opTime": optime(),
                "lastWriteDate": datetime.datetime.now(tz=datetime.timezone.utc),
                "majorityOpTime": optime(),
            },
        }

    def handle(request):
        doc = dict(request.doc)
        name = next(iter(doc), "")
        lowered = name.lower()
        if lowered in ("hello", "ismaster"):
            return request.ok(hello_doc())
        # Everything else is logged without the driver's bookkeeping fields.
        logged = {k: v for k, v in doc.items() if not k.startswith("$") and k != "lsid"}
        log.write(json_util.dumps(logged) + "\n")
        if name == "buildInfo" or name == "buildinfo":
            return request.ok(version=args.version, versionArray=[int(x) for x in args.version.split(".")[:3]] + [0])
        if name == "getCmdLineOpts":
            return request.ok(argv=["mongod"], parsed={"storage": {"dbPath": args.db_path}})
        if name == "fsync":
            if args.fail_fsync:
                return request.replies({"ok": 0, "errmsg": args.fail_fsync, "code": 2, "codeName": "BadValue"})
            with lock:
                state["lock_count"] += 1
                count = state["lock_count"]
            return request.ok(info="now locked against writes", lockCount=count)
        if name == "fsyncUnlock":
            with lock:
                if state["lock_count"] == 0:
                    return request.replies(
                        {"ok": 0, "errmsg": "fsyncUnlock called when not locked", "code": 125, "codeName": "CommandFailed"}
                    )
                state["lock_count"] -= 1
                count = state["lock_count"]
            return request.ok(info="fsyncUnlock completed", lockCount=count)
        return request.ok()

    server = MockupDB(port=0, verbose=False)
    server.autoresponds(handle)
    port = server.run()
    print(f"PORT {port}", flush=True)
    try:
        sys.stdin.read()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
