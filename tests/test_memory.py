"""memory.py: the activation estimate against what a real backward saves and takes, and the plan's
decisions (auto choices consistent, explicit oversize settings refused with their numbers)."""
import importlib.util
import re
from pathlib import Path

import pytest
import torch
from conftest import write_checkpoint

import memory
import model as M

GiB = 2 ** 30
BENCH = Path(__file__).resolve().parents[1] / "bench" / "memory.py"


def bench():
    spec = importlib.util.spec_from_file_location("bench_memory", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """Big enough that activations dominate a backward's peak RSS (tens to hundreds of MiB)."""
    return write_checkpoint(tmp_path_factory.mktemp("medium"), "qwen2-tied", vocab_size=2048, hidden_size=256,
                            layers=4, intermediate_size=1024)


@pytest.mark.parametrize("dtype,recompute,shape", [("float32", False, (1, 128)), ("float32", True, (3, 64)),
                                                   ("bfloat16", False, (3, 64)), ("bfloat16", True, (1, 128))])
def test_saved_bytes_match_what_autograd_saves(medium, dtype, recompute, shape):
    """Summed over the distinct storages a saved_tensors_hooks sees: within 1 % without recompute
    (the estimate leaves out the (B, T, 1) rsqrt outputs); with recompute at most 25 % over (at
    1024+ tokens in fp32 one block input shares a storage) and never more than 1 % under."""
    got = bench().child(str(medium), dtype, *shape, recompute, return_freed=False)["saved"]
    cfg = M.Config.from_json(medium / "config.json")
    est = shape[0] * shape[1] * memory.saved_bytes_per_token(cfg, M.resolve_dtype(dtype, None), recompute)
    if recompute:
        assert 0.99 * got <= est <= 1.25 * got, (est, got)
    else:
        assert abs(est / got - 1) < 0.01, (est, got)


@pytest.mark.parametrize("dtype,recompute,shape", [("float32", False, (2, 2048)), ("float32", True, (4, 1024))])
def test_peak_rss_of_a_backward_within_the_estimate(medium, dtype, recompute, shape):
    """Peak RSS growth of one backward in a fresh process (freed tensors returned to the OS, as
    train.py runs on CPU) against the plan's peak: at most 10 % above it (HEADROOM keeps 15 %) and at
    most 30 % below (the estimate must not waste the memory it plans). Measured on d=256: growth /
    estimate 0.96-0.98 without recompute, 0.89-0.90 with it (the redone block's activations are
    freed piecemeal); bf16 was 0.96 (1 x 2048), left to bench/memory.py (emulated bf16 is slow here)."""
    got = bench().measure(medium, dtype, *shape, recompute, return_freed=True)["growth"]
    est = bench().estimate(M.Config.from_json(medium / "config.json"), dtype, shape[0] * shape[1], recompute)["peak"]
    print(f"{dtype} recompute {recompute} {shape}: estimate {est / 2**20:.0f} MiB, peak RSS growth {got / 2**20:.0f} MiB")
    assert est / 1.3 <= got <= 1.1 * est, (est, got)


def test_weights_and_training_state_match_the_model(medium):
    """The plan's weight and optimizer bytes against model.py's own count of a loaded model."""
    model = M.Transformer.from_pretrained(medium, dtype="bfloat16")
    cfg = model.config
    for kind in ("steering", "lora", "full"):
        model.set_adapter(kind)
        sizes = model.trainable_bytes()
        trainable = sum(p.numel() for p in model.trainable_parameters())
        p = memory.plan(cfg, torch.bfloat16, "cpu", available=64 * GiB, adapter=kind, trainable=trainable,
                        sequences=4, longest=64)
        assert p.weights == sum(w.numel() * w.element_size() for w in model.base_weights().values())
        adapter = sizes["weights"] - p.weights  # the adapter's own fp32 tensors (0 for full)
        assert p.training_state == adapter + sizes["masters"] + sizes["grads"] + sizes["optimizer"], kind


QWEN_05B = M.Config.from_dict(dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                                   num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                                   tie_word_embeddings=True))


def cpu_plan(available, **kw):
    args = dict(adapter="steering", trainable=24 * 896, sequences=64, longest=512)
    return memory.plan(QWEN_05B, torch.bfloat16, kw.pop("device", "cpu"), available=available, **(args | kw))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_more_memory_never_plans_less_and_recomputes_only_when_needed(device):
    """As memory grows: recompute only turns off, the KV pool and (for one recompute choice) the
    micro-batch never shrink, and every plan fits what it planned against. Recompute is chosen
    only when needed: without it the plan would be refused (CPU: one longest row; CUDA: the whole
    step in one micro-batch)."""
    previous, seen = None, set()
    for gib in [2 + 0.5 * i for i in range(100)]:
        try:
            p = cpu_plan(int(gib * GiB), device=device)
        except memory.MemoryPlanError:
            assert previous is None, f"{gib} GiB refused after a smaller size fitted"
            continue
        seen.add(p.recompute)
        assert p.weights + p.training_state + p.kv_bytes + p.activation_bytes <= p.usable
        assert 512 <= p.micro_batch_tokens <= 64 * 512
        if p.recompute:
            whole_step = None if device == "cpu" else 64 * 512
            with pytest.raises(memory.MemoryPlanError):
                cpu_plan(int(gib * GiB), device=device, recompute=False, micro_batch_tokens=whole_step)
        if previous is not None:
            assert p.kv_cache_tokens >= previous.kv_cache_tokens
            assert not (p.recompute and not previous.recompute), f"recompute turned on at {gib} GiB"
            if p.recompute == previous.recompute:
                assert p.micro_batch_tokens >= previous.micro_batch_tokens
        previous = p
    assert seen == {True, False}, seen  # the sweep crosses the point where recompute turns off


def test_explicit_oversize_settings_are_refused_with_the_numbers():
    with pytest.raises(memory.MemoryPlanError) as e:
        cpu_plan(16 * GiB, micro_batch_tokens=65536, recompute=False)
    msg = str(e.value)
    assert "65,536 tokens" in msg and "recompute off" in msg and "--micro-batch-tokens" in msg, msg
    suggested = int(re.search(r"lower --micro-batch-tokens to ([\d,]+)", msg).group(1).replace(",", ""))
    assert cpu_plan(16 * GiB, micro_batch_tokens=suggested, recompute=False).micro_batch_tokens == suggested
    with pytest.raises(memory.MemoryPlanError, match="--activation-checkpointing"):
        cpu_plan(3 * GiB, recompute=False, longest=4096)
    with pytest.raises(memory.MemoryPlanError, match="--kv-cache-tokens"):
        cpu_plan(8 * GiB, kv_cache_tokens=2 ** 20)
    with pytest.raises(memory.MemoryPlanError, match="--kv-cache-tokens 256 cannot hold one sequence of 512"):
        cpu_plan(8 * GiB, kv_cache_tokens=256)
    with pytest.raises(memory.MemoryPlanError, match="do not fit"):
        cpu_plan(8 * GiB, adapter="full", trainable=memory.weight_count(QWEN_05B))


def test_plan_prints_once_and_round_trips_json():
    p = cpu_plan(22 * GiB)
    text = p.summary()
    assert "\n" not in text and f"# KV blocks: {p.kv_cache_tokens // 16} of 16" in text
    assert f"micro-batch {p.micro_batch_tokens:,} tokens" in text and "recompute off" in text
    assert memory.Plan.from_json(p.to_json()) == p
    sampling = cpu_plan(22 * GiB, backward=False)
    assert sampling.micro_batch_tokens is None and "micro-batch" not in sampling.summary()


def test_available_bytes_on_cpu():
    total = int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal:")).split()[1]) * 1024
    assert 0 < memory.available_bytes("cpu") <= total
