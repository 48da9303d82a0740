"""A slow link to etcd (tests only): `python slow_relay.py LISTEN_IP:PORT TARGET_IP:PORT SECONDS` relays TCP and
holds every chunk SECONDS in each direction. The lab has no netem; this widens the time between a client's requests
the way a distant etcd would, so that races between hosts happen in a few rounds instead of by luck."""
import socket
import sys
import threading
import time


def pump(source: socket.socket, sink: socket.socket, delay: float) -> None:
    try:
        while data := source.recv(65536):
            time.sleep(delay)
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def main() -> None:
    (listen_ip, listen_port), (target_ip, target_port) = (a.rsplit(":", 1) for a in sys.argv[1:3])
    delay = float(sys.argv[3])
    server = socket.create_server((listen_ip, int(listen_port)))
    while True:
        client, _ = server.accept()
        try:
            upstream = socket.create_connection((target_ip, int(target_port)))
        except OSError:
            client.close()
            continue
        for source, sink in ((client, upstream), (upstream, client)):
            threading.Thread(target=pump, args=(source, sink, delay), daemon=True).start()


if __name__ == "__main__":
    main()
