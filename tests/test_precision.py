"""The training precision is decided in one place, and can be forced from outside."""
import pytest

from pill.errors import ConfigError
from pill.precision import cpu_bf16_flags, resolve_precision

NO_BF16 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma avx512f avx512bw\n"
BF16 = "processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"


@pytest.fixture
def cpu(monkeypatch, tmp_path):
    """Pretend the CPU reports the given /proc/cpuinfo text."""
    import pill.precision as precision

    def use(text):
        path = tmp_path / "cpuinfo"
        path.write_text(text)
        monkeypatch.setattr(precision, "cpu_bf16_flags", lambda cpuinfo=str(path): cpu_bf16_flags(cpuinfo))
    return use


def test_auto_follows_the_cpu(cpu, monkeypatch):
    monkeypatch.delenv("PILL_PRECISION", raising=False)
    cpu(NO_BF16)
    p = resolve_precision("auto", cuda=False)
    assert (p.mixed_precision, p.name) == ("no", "float32") and "no native bf16" in p.reason
    cpu(BF16)
    p = resolve_precision("auto", cuda=False)
    assert p.mixed_precision == "bf16" and "avx512_bf16, amx_bf16" in p.reason


@pytest.mark.parametrize("env, expected", [("float32", "no"), ("fp32", "no"), ("no", "no"), ("bf16", "bf16"),
                                           ("BF16", "bf16")])
def test_the_environment_decides_auto(cpu, monkeypatch, env, expected):
    cpu(BF16 if expected == "no" else NO_BF16)  # against what the CPU would pick
    monkeypatch.setenv("PILL_PRECISION", env)
    p = resolve_precision("auto", cuda=False)
    assert p.mixed_precision == expected and p.reason == f"forced by PILL_PRECISION={env}"


def test_a_configured_precision_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("PILL_PRECISION", "bf16")
    assert resolve_precision("no").mixed_precision == "no"
    assert resolve_precision("bf16").reason == "as configured"


def test_bad_values_name_where_they_come_from(monkeypatch):
    monkeypatch.setenv("PILL_PRECISION", "fp8")
    with pytest.raises(ConfigError, match="PILL_PRECISION: must be one of auto, bf16, float32"):
        resolve_precision("auto", cuda=False)
    with pytest.raises(ConfigError, match="precision: must be one of"):
        resolve_precision("half")


def test_unreadable_cpuinfo_means_no_bf16(tmp_path):
    assert cpu_bf16_flags(str(tmp_path / "missing")) == []
