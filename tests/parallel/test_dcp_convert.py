"""`league convert` across ranks: hf-to-dcp and dcp-to-hf by 2 ranks write what one process writes (one launch of 2
gloo processes for every world-2 check), and the command runs under torchrun."""

import filecmp
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from league.cli import app
from tests.parallel.expect import results

pytestmark = pytest.mark.xdist_group("world2")


def test_two_ranks_convert_as_one_process(world2):
    result = results(world2, "dcp_convert_two_ranks_equal_one")[0]
    assert result["dcp_equal"] and result["num_mtp"] > 0
    assert [f for f in result["dcp_files"] if f.endswith(".distcp")] == ["__0_0.distcp", "__1_0.distcp"]
    assert {"config.json", "tokenizer.json"} <= set(result["dcp_files"])
    shards = [f for f in result["hf_files"] if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in result["hf_files"]  # both ranks wrote shards
    assert result["hf_identical"]


def test_convert_under_torchrun(tmp_path):
    """`torchrun --nproc-per-node 2 -m league convert ...` both ways: the Hugging Face folder comes back
    byte-identical (one file: the tiny checkpoint is below the shard size)."""
    assert CliRunner().invoke(app, ["init", "--preset", "tiny", "--out", str(tmp_path / "hf")]).exit_code == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "league"]
    for args in (
        ["convert", "hf-to-dcp", "--hf-checkpoint", str(tmp_path / "hf"), "--save", str(tmp_path / "dcp")],
        ["convert", "dcp-to-hf", "--load", str(tmp_path / "dcp"), "--save", str(tmp_path / "back")],
    ):
        done = subprocess.run([*torchrun, *args], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert done.stdout.count("wrote") == 1  # rank 0 reports
    assert sorted(p.name for p in (tmp_path / "dcp").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    names = sorted(p.name for p in (tmp_path / "hf").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "back").iterdir())
    assert all(filecmp.cmp(tmp_path / "hf" / n, tmp_path / "back" / n, shallow=False) for n in names)
