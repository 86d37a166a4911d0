"""experiments/verify.py's checks (lm_jax/verify.py) pass on the 8 fake CPU devices of the
suite, none skipped (splash runs in interpret mode; cuDNN is not offered on CPU); a check whose
two sides disagree is a FAIL and the binary exits 1."""

import pytest

from lm_jax import verify


def test_every_check_passes_on_8_cpu_devices():
    checks = verify.run_checks()
    names = [c.name for c in checks]
    assert names == ["attention:splash", "moe", "chunked_loss", "sharded",
                     "cross_mesh_restore", "hf_parity"]  # fmt: skip
    for c in checks:
        assert c.status == "ok", (c.name, c.diff, c.tol, c.skipped)
    text = verify.table(checks)
    assert "8 x cpu" in text and text.count("| ok |") == len(checks)


def test_a_disagreement_is_a_failure_and_exits_1(monkeypatch, capsys, load_binary):
    bad = verify.Check("moe", "broken on purpose", diff=1e-3, tol=1e-5)
    assert not bad.ok and bad.status == "FAIL"
    monkeypatch.setattr(verify, "CHECKS", {"moe": lambda: [bad]})
    binary = load_binary("experiments/verify.py", [])
    with pytest.raises(SystemExit) as e:
        binary.main([])
    assert e.value.code == 1
    assert "| moe | broken on purpose | 1.00e-03 | 1e-05 | FAIL |" in capsys.readouterr().out
