"""Every stencil and pointwise kernel lowers for Hopper (sm_90) at the exact configurations the launchers pick
for the search's shapes, in fp32 and bf16, without register spills. No GPU needed: triton.compile with a CUDA
target runs ptxas; its `-v` report (printed when TRITON_DUMP_PTXAS_LOG=1) holds registers and spills."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
from milenas_fast.ops.tiles import GPU_MAX_TILE, group_config, launch_config  # noqa: E402

KERNELS = {"fwd": "stencil_fwd_kernel", "bwd_input": "stencil_bwd_input_kernel",
           "bwd_weight": "stencil_bwd_weight_kernel"}
SEARCH_SHAPES = [(64, 16, 32), (64, 32, 16), (64, 64, 8)]  # batch 64: the three cell resolutions
# (input shape, stride) of the search's edges: stride 1 at every resolution; stride 2 where the two reduction cells
# read 32×32 and 16×16 states (no edge reads 8×8 at stride 2)
SEARCH_LAUNCHES = [(shape, 1) for shape in SEARCH_SHAPES] + [((64, 32, 32), 2), ((64, 64, 16), 2)]


def configs() -> list[tuple[str, int, int, int, int]]:
    """(kernel, STRIDE, BLOCK_P, BLOCK_HW, num_warps) the GPU launcher uses, without duplicates."""
    out = set()
    for (N, C, H), stride in SEARCH_LAUNCHES:
        for kernel in KERNELS:
            bp, bhw, _, warps = launch_config(kernel, (N, C, H, H), stride, GPU_MAX_TILE)
            out.add((kernel, stride, bp, bhw, warps))
    return sorted(out)


def jobs() -> list[dict]:
    """What to compile: every stencil configuration with all six branches (the most work, the identity's gradient
    added at stride 1); the sep convs' second stages (relu_depthwise_pair: the 3×3 and 5×5 branches on two inputs,
    stride 1, with and without the inner BNs' normalisation on load); the pointwise
    kernels at the search's channel counts (fp32 weights, as the fused path passes them)."""
    src = Path(__file__).resolve().parents[1] / "kernels"
    out = []
    for kernel, stride, bp, bhw, warps in configs():
        base = {"file": str(src / "stencil.py"), "name": KERNELS[kernel], "warps": warps,
                "fp32_ptrs": ["part_ptr", "mean_ptr", "rstd_ptr", "uvar_ptr", "st_ptr"]}
        # HASACC (x's gradient from the identity candidate) only at stride 1: a stride-2 mixed op has no identity
        consts = dict(STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, X5=False, HASACC=stride == 1, NORM=False)
        # every pointer but part_ptr/st_ptr is a tuple of E (here one edge; the group ops' 8 below)
        out.append({**base, "key": f"{kernel} s{stride} P{bp} HW{bhw} w{warps}", "has": "all",
                    "tuples": _tuples(kernel, 1), "consts": {**consts, "E": 1}})
        if stride == 1:  # the pair, on the inner BNs' outputs (eval) or inputs normalised as loaded (NORM, train:
            # the forward merging the statistics from tile statistics, NORM 2)
            for norm in (0, 1, 2) if kernel == "fwd" else (0, 1):
                out.append({**base, "key": f"{kernel} pair norm{norm} P{bp} HW{bhw} w{warps}",
                            "consts": {**consts, "X5": True, "HASACC": False, "NORM": norm, "E": 1},
                            "has": ["HAS3", "HAS5"], "tuples": _tuples(kernel, 1)})
    for (N, C, H), stride in SEARCH_LAUNCHES:  # the group ops: a fused cell's group of 8 edges, their own configurations
        for kernel in KERNELS:
            bp, bhw, _, warps = group_config((N, C, H, H), stride, GPU_MAX_TILE, kernel)
            base = {"file": str(src / "stencil.py"), "name": KERNELS[kernel], "warps": warps,
                    "fp32_ptrs": ["st_ptr", "part_ptr"], "tuples": _tuples(kernel, 8)}
            consts = dict(STRIDE=stride, BLOCK_P=bp, BLOCK_HW=bhw, X5=False, HASACC=stride == 1, NORM=False, E=8)
            out.append({**base, "has": "all", "key": f"{kernel} group s{stride} P{bp} HW{bhw} w{warps} E8",
                        "consts": consts})
            if stride == 1:  # the pairs (NORM: their inner BNs' batch statistics; the forward's merged, NORM 2)
                out.append({**base, "has": ["HAS3", "HAS5"], "consts": {**consts, "X5": True, "HASACC": False,
                                                                        "NORM": 2 if kernel == "fwd" else 1},
                            "key": f"{kernel} pair group P{bp} HW{bhw} w{warps} E8"})
    from milenas_fast.ops.pointwise import stats_warps
    from milenas_fast.ops.tiles import GPU_POINTWISE_TILE, pointwise_blocks
    for N, C, H in SEARCH_SHAPES:
        ba, bb, bp = pointwise_blocks(C, C, H * H, GPU_POINTWISE_TILE)
        # K: one edge's four conv candidates, and the fused Cell's largest group (8 edges' first stages, the sep
        # convs' 16 outputs with tile statistics)
        for name, k, stats in (("pointwise_kernel", 4, 0), ("pointwise_kernel", 4, 3),
                               ("pointwise_kernel", 32, 0xFFFF), ("pointwise_wgrad_kernel", 4, 0),
                               ("pointwise_wgrad_kernel", 32, 0)):
            fwd = name == "pointwise_kernel"
            tuples = {"ins": "dt", "ws": "fp32", "outs": "dt"} if fwd else {"xs": "dt", "gs": "dt"}
            out.append({"file": str(src / "pointwise.py"), "name": name, "warps": stats_warps(stats), "has": "all",
                        "fp32_ptrs": ["part_ptr", "stats_ptr"], "tuples": {t: [v, k] for t, v in tuples.items()},
                        "key": f"{name} K{k} C{C} HW{H * H}" + (" stats" if stats else ""),
                        "consts": dict(K=k, BLOCK_A=ba, BLOCK_B=bb, BLOCK_P=bp, UPCAST=False, PRECISION="auto",
                                       STATS=stats)})
    return list({job["key"]: job for job in out}.values())  # shapes that share a configuration compile once


_TUPLES = {"fwd": ("xs", "x5s", "w3s", "w5s", "wd3s", "wd5s", "y3s", "y5s", "yd3s", "yd5s", "ymaxs", "yavgs"),
           "bwd_input": ("xs", "x5s", "w3s", "w5s", "wd3s", "wd5s", "ymaxs", "g3s", "g5s", "gd3s", "gd5s", "gmaxs",
                         "gavgs", "gaccs", "dxs", "dx5s"),
           "bwd_weight": ("xs", "x5s", "g3s", "g5s", "gd3s", "gd5s")}


def _tuples(kernel: str, e: int) -> dict:
    """A stencil kernel's tuple parameters (e pointers each): data in the run's dtype, statistics fp32."""
    stats = ("means", "rstds", "uvars") if kernel == "fwd" else ("means", "rstds")
    return {**{n: ["dt", e] for n in _TUPLES[kernel]}, **{n: ["fp32", e] for n in stats}}


_COMPILE = r"""
import contextlib, importlib.util, io, json, os, re, sys, tempfile
os.environ["TRITON_INTERPRET"] = "0"  # the interpreter's patched triton.language cannot compile
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v report on stdout
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()  # a cache hit would skip ptxas (no report)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
mods = {}
dt, res = sys.argv[1], {}
for job in json.loads(sys.argv[2]):
    if job["file"] not in mods:
        spec = importlib.util.spec_from_file_location("_k%d" % len(mods), job["file"])
        mods[job["file"]] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mods[job["file"]])
    fn = getattr(mods[job["file"]], job["name"])
    sig = {p.name: "constexpr" if p.is_constexpr else
           ("*fp32" if p.name in job["fp32_ptrs"] else "*" + dt) if p.name.endswith("_ptr") else
           ("fp32" if p.name == "eps" else "i32")
           for p in fn.params}
    for name, (kind, k) in job.get("tuples", {}).items():  # a tuple of k pointers
        sig[name] = tuple(["*" + (dt if kind == "dt" else kind)] * k)
    consts = {p.name: job["has"] == "all" or p.name in job["has"] for p in fn.params if p.name.startswith("HAS")}
    consts.update((k, v) for k, v in job["consts"].items() if k in sig)  # a flag only some kernels have
    if consts.get("PRECISION") == "auto":  # as the launcher: TF32 for fp32 (cuDNN's default), bf16 exact
        consts["PRECISION"] = "tf32" if dt == "fp32" else "ieee"
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            k = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                               options={"num_warps": job["warps"]})
    except Exception as e:
        res[job["key"]] = {"error": repr(e)[-2000:]}
        continue
    text = log.getvalue()
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    regs = re.findall(r"Used (\d+) registers", text)
    res[job["key"]] = {"cubin": bool(k.asm.get("cubin")), "regs": max(map(int, regs), default=-1),
                       "spill_bytes": sum(int(a) + int(b) for a, b in spills), "reports": len(spills),
                       "log": text[-1500:]}
print(json.dumps(res))
"""


# Results are cached by what determines them (the kernels' source, the jobs, this script, Triton's version, which
# bundles ptxas): a rerun of unchanged kernels reads the reports instead of compiling ~70 kernels per dtype again.
CACHE = Path(os.environ.get("MILENAS_FAST_TEST_CACHE", Path.home() / ".cache" / "milenas-fast-tests")) / "sm90"


def _cache_file(dt: str, todo: list[dict]) -> Path:
    import triton

    h = hashlib.sha256()
    for f in sorted(Path(__file__).resolve().parents[1].joinpath("kernels").glob("*.py")):
        h.update(f.name.encode() + f.read_bytes())
    h.update(json.dumps([{**j, "file": Path(j["file"]).name} for j in todo], sort_keys=True).encode())
    h.update(f"{_COMPILE}{dt}{triton.__version__}".encode())
    return CACHE / f"{dt}-{h.hexdigest()[:32]}.json"


@pytest.fixture(scope="module")
def sm90_builds():
    """Compile every job for sm_90 in fp32 and bf16: two fresh processes (one per core), or the cached reports."""
    todo = jobs()
    cache = {dt: _cache_file(dt, todo) for dt in ("fp32", "bf16")}
    out, procs = {}, {}
    for dt, cached in cache.items():
        if cached.is_file():
            out[dt] = json.loads(cached.read_text())
        else:
            procs[dt] = subprocess.Popen([sys.executable, "-c", _COMPILE, dt, json.dumps(todo)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for dt, p in procs.items():
        so, se = p.communicate(timeout=1200)
        assert p.returncode == 0, se[-3000:]
        out[dt] = json.loads(so.strip().splitlines()[-1])
        cached = cache[dt]
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(out[dt]))
        tmp.replace(cached)
    return out


def test_configs_are_the_launchers():
    """The search shapes use large tiles (whole 32×32 planes; several small planes per program)."""
    cs = configs()
    assert ("fwd", 1, 1, 1024, 8) in cs and ("bwd_input", 2, 1, 1024, 8) in cs and ("fwd", 2, 8, 64, 8) in cs
    assert all(bp * bhw <= (GPU_MAX_TILE if bp == 1 else GPU_MAX_TILE // 2) for _, _, bp, bhw, _ in cs)
    assert {k for k, *_ in cs} == set(KERNELS)


@pytest.mark.slow
@pytest.mark.stack  # ptxas comes with Triton: each version spills differently
@pytest.mark.gpu_path
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_sm90_no_spills(sm90_builds, dtype):
    built = sm90_builds[dtype]
    assert len(built) == len(jobs())
    bad = []
    for key, r in built.items():
        if "error" in r:
            bad.append(f"{key}: {r['error']}")
        elif not r["cubin"] or r["reports"] < 1:  # no ptxas report: spills unknown
            bad.append(f"{key}: no cubin or no ptxas report:\n{r['log']}")
        elif r["spill_bytes"]:
            bad.append(f"{key}: {r['spill_bytes']} bytes spilled ({r['regs']} registers)")
    print(dtype, "registers:", {k: r.get("regs") for k, r in built.items()})
    assert not bad, f"{dtype}:\n" + "\n".join(bad)
