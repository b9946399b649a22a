"""A remote mail server for the deployment test: stdlib only (it runs in the bare base image), it
accepts every message and writes each to /mail/N.eml, then prints one line. Not for production."""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

COUNT = itertools.count(1)
MAILDIR = os.environ.get("SINK_DIR", "/mail")


async def session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"220 sink ESMTP\r\n")
    rcpts = 0
    try:
        while line := await asyncio.wait_for(reader.readline(), 60):
            verb = line[:4].upper()
            if verb in (b"EHLO", b"HELO"):
                writer.write(b"250-sink\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
            elif verb == b"MAIL":
                rcpts = 0
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                rcpts += 1
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                await writer.drain()
                data = bytearray()
                while (chunk := await reader.readline()) not in (b".\r\n", b""):
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                n = next(COUNT)
                with open(os.path.join(MAILDIR, f"{n}.eml"), "wb") as f:
                    f.write(data)
                print(f"sink: message {n}, {rcpts} recipient(s), {len(data)} octets", flush=True)
                writer.write(f"250 2.0.0 Ok: queued as SINK{n}\r\n".encode())
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                break
            else:  # RSET, NOOP and anything else
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
    except (TimeoutError, ConnectionError):
        pass
    finally:
        writer.close()


async def main() -> None:
    os.makedirs(MAILDIR, exist_ok=True)
    server = await asyncio.start_server(session, "0.0.0.0", int(sys.argv[1]) if len(sys.argv) > 1 else 25)
    print("sink: listening", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
