"""moegen.ops.cpu: the one reader of /proc/cpuinfo (build key, experts ISA choice, probe, peers)."""
import pytest

from moegen.ops import cpu

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx2 avx512f avx512_bf16

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu avx2 avx512f avx512_bf16
"""
ARM = """processor\t: 0
Features\t: fp asimd sve bf16
CPU part\t: 0xd4f
"""


@pytest.fixture
def cpuinfo(tmp_path, monkeypatch):
    """Point the reader at a file of the given text (None: no such file), its cache cleared."""
    def use(text):
        path = tmp_path / "cpuinfo"
        if text is not None:
            path.write_text(text)
        monkeypatch.setattr(cpu, "CPUINFO", str(path))
        cpu._lines.cache_clear()
    yield use
    cpu._lines.cache_clear()


def test_x86_fields(cpuinfo):
    cpuinfo(X86)
    assert cpu.vendor() == "AuthenticAMD"
    assert cpu.field("model name") == "AMD EPYC 9R14"
    assert cpu.flags() == {"fpu", "avx2", "avx512f", "avx512_bf16"}
    # one line per distinct field value: the two CPUs' identical lines count once
    assert cpu.identity() == "flags: fpu avx2 avx512f avx512_bf16\nmodel name: AMD EPYC 9R14\n"


def test_arm_identity_and_missing_fields(cpuinfo):
    cpuinfo(ARM)
    assert cpu.vendor() == "" and cpu.flags() == set()
    assert cpu.identity() == "CPU part: 0xd4f\nFeatures: fp asimd sve bf16\n"


def test_no_cpuinfo(cpuinfo):
    cpuinfo(None)
    assert cpu.vendor() == "" and cpu.flags() == set() and cpu.identity() == ""
