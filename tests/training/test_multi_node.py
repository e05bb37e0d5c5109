"""Training across hosts: XTuner's own multi-node variables become torchrun's rendezvous flags."""
from __future__ import annotations

from training.run import _multi_node


def test_one_host_adds_nothing(monkeypatch):
    monkeypatch.delenv("NNODES", raising=False)
    assert _multi_node() == []


def test_several_hosts_pass_xtuners_variables_to_torchrun(monkeypatch):
    for k, v in dict(NNODES="2", NODE_RANK="1", ADDR="10.0.0.5", PORT="29600").items():
        monkeypatch.setenv(k, v)
    assert _multi_node() == ["--nnodes=2", "--node_rank=1", "--master_addr=10.0.0.5", "--master_port=29600"]
