"""Two hosts for real: two network namespaces joined by a veth pair, one `torchrun --nnodes=2` in each (c10d
rendezvous), training one mesh across both. Needs root and iproute2; skipped otherwise."""
import os
import shutil
import subprocess
import sys

import pytest

from meshtron import checkpoint as ck

IP = shutil.which("ip")
pytestmark = pytest.mark.skipif(IP is None or os.geteuid() != 0, reason="needs root and iproute2 (network namespaces)")


def _sh(*args):
    return subprocess.run([IP, *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    tag = f"{os.getpid() % 10000}"
    a, b = f"mtA{tag}", f"mtB{tag}"
    net = f"10.231.{os.getpid() % 250}"
    steps = [("netns", "add", a), ("netns", "add", b), ("link", "add", f"va{tag}", "type", "veth", "peer", "name",
             f"vb{tag}"), ("link", "set", f"va{tag}", "netns", a), ("link", "set", f"vb{tag}", "netns", b),
             ("-n", a, "addr", "add", f"{net}.1/24", "dev", f"va{tag}"),
             ("-n", b, "addr", "add", f"{net}.2/24", "dev", f"vb{tag}"),
             ("-n", a, "link", "set", f"va{tag}", "up"), ("-n", b, "link", "set", f"vb{tag}", "up"),
             ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")]
    try:
        for step in steps:
            if _sh(*step).returncode != 0:
                pytest.skip(f"cannot build network namespaces here: ip {' '.join(step)}")
        yield (a, f"va{tag}", f"{net}.1"), (b, f"vb{tag}", f"{net}.2")
    finally:
        _sh("netns", "del", a)
        _sh("netns", "del", b)


@pytest.mark.slow
def test_torchrun_two_nodes(two_hosts, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    (host_a, if_a, addr_a), (host_b, if_b, addr_b) = two_hosts
    train = ["-m", "meshtron", "train", "--mesh", "batch:2,model:2", "--model", "gpt-tiny", "--steps", "4",
             "--batch-size", "8", "--seq-len", "32", "--sample-tokens", "0", "--out", str(tmp_path / "run")]

    def node(ns, ifname, addr, is_host):
        cmd = [IP, "netns", "exec", ns, "env", f"GLOO_SOCKET_IFNAME={ifname}", "OMP_NUM_THREADS=1", torchrun,
               "--nnodes=2", "--nproc_per_node=2", "--rdzv_backend=c10d", f"--rdzv_endpoint={addr_a}:29500",
               f"--rdzv_conf=is_host={is_host}", f"--local-addr={addr}"] + train
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = [node(host_a, if_a, addr_a, 1), node(host_b, if_b, addr_b, 0)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    path = ck.latest_checkpoint(str(tmp_path / "run" / "checkpoints"))
    assert ck.read_meta(path)["step"] == 4 and ck.read_meta(path)["mesh"] == "batch:2,model:2"
