"""Starting `meshtron serve`: every rank opens its shards of the model; rank 0 runs uvicorn and the scheduler,
the others follow rank 0's control messages. Without torchrun, this process becomes rank 0 and starts the
other ranks as child processes (killed by the kernel if it dies), so a signal to it reaches the server.

Invariant: shutdown goes one way: SIGINT/SIGTERM stop uvicorn on rank 0 (in-flight requests get a few seconds),
then the scheduler broadcasts `exit`, every rank leaves its loop and the process group is destroyed; children
still alive after that are killed. Children ignore SIGINT/SIGTERM so that a terminal's Ctrl-C (sent to the
whole process group) cannot stop them before rank 0 has told them to. A failure is fatal: a rank whose engine
fails exits 1, and rank 0 stops serving (503) as soon as a collective fails or a child exits. Nothing listens
beyond the master address: the ranks' store is bound to it (127.0.0.1 when this process starts the ranks), and
gloo to the loopback interface then.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass

LAUNCHED = "MESHTRON_SERVE_LAUNCHED"          # set by `launch` for every rank it starts (itself included)
_on_peer_exit: list = []                     # rank 0's callback when a child rank exits while serving
_store_socket: list = []                     # keeps the store's bound listening socket open

@dataclass
class ServeOptions:
    path: str
    mesh: str = "model:1"
    layout: str | None = None
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_prompt_tokens: int | None = None      # None: the model's context minus one
    max_tokens_limit: int | None = None       # None: the model's context
    max_body_bytes: int = 1 << 20
    max_batch: int = 32
    threads_per_rank: int | None = None
    log_requests: bool = False
    chat_template: str | None = None          # a Jinja file; None: the model folder's own template, if any

    @property
    def world(self) -> int:
        from meshtron.mesh import parse_mesh_spec
        n = 1
        for size in parse_mesh_spec(self.mesh).values():
            n *= size
        return n

    @property
    def model_name(self) -> str:
        return self.served_model_name or os.path.basename(os.path.normpath(self.path))


def serve_rank(opts: ServeOptions) -> int:
    """Run one rank of the server (rank 0 serves HTTP until a signal; the others follow)."""
    import torch
    import torch.distributed as dist

    from meshtron.inference import Engine, model_eos_ids
    from meshtron.load import open_model
    from meshtron.mesh import Mesh
    from meshtron.serve.scheduler import Control, follow

    local = int(os.environ.get("LOCAL_WORLD_SIZE", opts.world))           # ranks on this machine
    torch.set_num_threads(opts.threads_per_rank or max(1, (os.cpu_count() or 1) // local))
    if os.environ.get(LAUNCHED) and opts.world > 1 and not dist.is_initialized():
        _init_process_group()
    mesh = Mesh.from_spec(opts.mesh)
    model, tok, src = open_model(opts.path, mesh, opts.layout, opts.tokenizer)
    control = Control(mesh.world_size)
    engine = Engine(model, tok, model_eos_ids(src, tok), text=mesh.rank == 0)
    code = 1
    try:
        if mesh.rank == 0:
            code = _serve_http(opts, engine, control, tok, src)
            return code
        try:
            follow(engine, control, mesh.rank)
        except BaseException as e:  # noqa: BLE001 - out of step with the others: stop serving, say why
            traceback.print_exc()
            print(f"meshtron serve: rank {mesh.rank}: {type(e).__name__}: {e}; this rank stops", file=sys.stderr,
                  flush=True)
            return 1
        code = 0
        return 0
    finally:
        if dist.is_initialized() and code == 0:     # after a failure a peer may never join the teardown
            dist.destroy_process_group()


def _init_process_group() -> None:
    """The ranks' process group on a TCPStore that listens on MASTER_ADDR only (torch's own env:// store listens
    on every interface): rank 0 binds the socket itself and hands it to the store."""
    import torch
    import torch.distributed as dist

    from meshtron.mesh import DEFAULT_TIMEOUT_S
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)
    fd = None
    if rank == 0:
        listen = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind((addr, port))
        listen.listen(max(128, 4 * world))
        _store_socket.append(listen)
        fd = listen.fileno()
    store = dist.TCPStore(addr, port, world, rank == 0, timeout, wait_for_workers=False, master_listen_fd=fd)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world, timeout=timeout)


def _serve_http(opts: ServeOptions, engine, control, tok, src) -> int:
    import uvicorn

    from meshtron.serve.app import build_app
    from meshtron.serve.chat import load_template
    from meshtron.serve.protocol import Limits
    from meshtron.serve.scheduler import Scheduler

    cfg = src.config
    limits = Limits(max_prompt_tokens=opts.max_prompt_tokens or cfg.max_seq_len - 1,
                    max_tokens=opts.max_tokens_limit or cfg.max_seq_len, max_seq_len=cfg.max_seq_len,
                    vocab_size=cfg.vocab_size)
    server_box: list = []

    def fatal(e: BaseException) -> None:
        print(f"meshtron serve: error: {type(e).__name__}: {e}; stopping (every rank)", file=sys.stderr, flush=True)
        server_box[0].should_exit = True

    scheduler = Scheduler(engine, control, opts.max_batch, on_fatal=fatal)
    _on_peer_exit.append(lambda message: scheduler.fail(RuntimeError(message)))
    chat = load_template(opts.path, opts.chat_template)
    app = build_app(scheduler, tok, opts.model_name, limits, opts.api_key, opts.max_body_bytes, chat_template=chat)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, log_level="warning", access_log=opts.log_requests,
                            timeout_graceful_shutdown=5, lifespan="off")
    if opts.log_requests:                      # uvicorn logs each request at INFO; the rest stays at warning
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    server = uvicorn.Server(config)
    server_box.append(server)

    # uvicorn runs in a thread; the scheduler (and so torch) in the main thread, where torch's OpenMP threads
    # run about 1.5x faster than under another thread. A signal stops uvicorn (in-flight requests still get
    # their tokens for a few seconds); when it is done the scheduler stops and tells the other ranks to exit.
    def on_signal(*_):
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    http = threading.Thread(target=server.run, name="meshtron-http", daemon=True)
    http.start()
    while not server.started and http.is_alive():
        time.sleep(0.02)
    if not server.started:                                   # uvicorn could not start (it said why)
        scheduler.stop()
    else:
        print(f"meshtron serve: {opts.model_name} ({cfg.family}, {cfg.num_params() / 1e6:.1f}M params) on mesh "
              f"{opts.mesh}, listening on http://{opts.host}:{opts.port} (POST /v1/completions, "
              f"{'POST /v1/chat/completions, ' if chat is not None else ''}GET /v1/models, GET /health)", flush=True)
    threading.Thread(target=lambda: (http.join(), scheduler.stop()), name="meshtron-http-watch", daemon=True).start()
    scheduler.run()
    server.should_exit = True
    http.join(10)
    if scheduler.error is not None or not server.started:
        return 1
    print("meshtron serve: stopped", flush=True)
    return 0


# ---- one machine, no torchrun: this process is rank 0 and starts the others --------------------------------

def _die_with_parent() -> None:
    """In a child: the kernel kills it when its parent dies (Linux), and it ignores Ctrl-C and SIGTERM."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def launch(opts: ServeOptions) -> int:
    """Serve on `opts.world` ranks of this machine: this process is rank 0, the others are children."""
    from meshtron.launch import free_port
    world = opts.world
    if world == 1:
        return serve_rank(opts)
    threads = opts.threads_per_rank or max(1, (os.cpu_count() or 1) // world)
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world),
           "LOCAL_WORLD_SIZE": str(world), "OMP_NUM_THREADS": str(threads), LAUNCHED: "1",
           "MESHTRON_SERVE_OPTIONS": json.dumps(dataclasses.asdict(opts))}
    env.setdefault("GLOO_SOCKET_IFNAME", "lo")    # one host: gloo's sockets on the loopback interface too
    children = []
    for rank in range(1, world):
        children.append(subprocess.Popen(
            [sys.executable, "-c", "from meshtron.serve.server import worker_main; raise SystemExit(worker_main())"],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}, preexec_fn=_die_with_parent))
    os.environ.update({k: env[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                                           "OMP_NUM_THREADS", LAUNCHED, "GLOO_SOCKET_IFNAME")}, RANK="0",
                      LOCAL_RANK="0")
    stopping = threading.Event()
    watcher = threading.Thread(target=_watch, args=(children, stopping), daemon=True)
    watcher.start()
    code = 1
    try:
        code = serve_rank(opts)
    finally:
        stopping.set()
        deadline = time.monotonic() + (10 if code == 0 else 0)      # after a failure the others cannot finish
        for child in children:
            try:
                child.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    failed = [c.returncode for c in children if c.returncode]
    return code or (1 if failed else 0)


def _watch(children, stopping: threading.Event) -> None:
    """If another rank dies while serving, stop this one (its collectives would fail or wait)."""
    while not stopping.wait(0.5):
        for rank, child in enumerate(children, start=1):
            code = child.poll()
            if code is not None and not stopping.is_set():
                message = f"rank {rank} exited with code {code}"
                print(f"meshtron serve: {message}; stopping the server", file=sys.stderr, flush=True)
                for callback in _on_peer_exit:      # /health answers 503 from now on
                    callback(message)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(15)
                if not stopping.is_set():
                    os._exit(1)
                return


def worker_main() -> int:
    opts = ServeOptions(**json.loads(os.environ["MESHTRON_SERVE_OPTIONS"]))
    code = serve_rank(opts)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)             # its work is done and its group destroyed: skip the interpreter's slow teardown
