"""The command line and the evaluation on tiny models saved to disk like a user's model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import Result
from transformers import GPT2Config, GPT2LMHeadModel
from typer.testing import CliRunner

from tests.models.tiny_models import VOCAB, run_arguments, save_tiny_model, tiny_loaded
from worker.cli.app import app
from worker.exceptions import UnsupportedModelError
from worker.model.loading import load_model
from worker.tools import decode_bench
from worker.tools.evaluation import EvalMode, evaluate_perplexity

TEXT = " ".join(f"line {i}: the service answered request {i} in {i % 17} ms." for i in range(40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


def test_run_prints_commentary_and_resumes_from_its_state(model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("\n".join(f"12:00:{i:02d} INFO request {i}" for i in range(12)) + "\n")
    args = run_arguments(log, tmp_path / "state", model_dir, every_records=4)
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    records = [json.loads(line) for line in first.stdout.splitlines() if line.startswith("{")]
    assert [(r["stream_id"], r["seq"], r["first_offset"], r["last_offset"]) for r in records] == [
        ("app", 0, 0, 3),
        ("app", 1, 4, 7),
        ("app", 2, 8, 11),
    ]
    with log.open("a") as handle:
        handle.write("".join(f"12:01:{i:02d} WARN slow request {i}\n" for i in range(4)))
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    again = [json.loads(line) for line in second.stdout.splitlines() if line.startswith("{")]
    assert [(r["seq"], r["first_offset"]) for r in again] == [(3, 12)]


def test_run_within_a_live_budget_writes_what_an_unbounded_run_does(
    model_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "app.log"
    log.write_text("".join(f"svc{i % 3}|12:00:{i:02d} INFO request {i}\n" for i in range(12)))

    def run(state: str, *extra: str) -> tuple[list, str]:
        args = run_arguments(log, tmp_path / state, model_dir, every_records=2)
        result = CliRunner().invoke(app, [*args, "--key-separator", "|", *extra])
        assert result.exit_code == 0, result.output
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        return sorted((r["stream_id"], r["seq"], r["text"]) for r in lines), result.stderr

    unbounded, _ = run("unbounded")
    bounded, summary = run("bounded", "--max-live-streams", "1")
    assert len(unbounded) == 6 and bounded == unbounded
    assert "evicted streams 11" in summary and "restored streams 9" in summary


def test_instruction_too_long_for_the_cache_exits_2(model_dir: Path, tmp_path: Path) -> None:
    log = tmp_path / "app.log"
    log.write_text("one line\n")
    result = CliRunner().invoke(
        app,
        [
            "run",
            "--source",
            f"file:{log}",
            "--model",
            str(model_dir),
            "--state",
            "memory:",
            "--window",
            "60",
        ],
    )
    assert result.exit_code == 2
    assert "shorten the instruction" in result.output


def test_run_with_a_missing_file_exits_2_with_a_message(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", "--source", f"file:{tmp_path / 'nope.log'}"])
    assert result.exit_code == 2
    assert "no file at" in result.output


def test_a_model_loads_without_transformers_progress_bars(
    model_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """A worker's stderr carries its logs; the caller's spinner says what is loading."""
    load_model(str(model_dir), device="cpu")
    assert "Loading weights" not in capfd.readouterr().err


def test_unsupported_architecture_is_refused_at_load(tmp_path: Path) -> None:
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB)).save_pretrained(
        tmp_path
    )
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        load_model(str(tmp_path), device="cpu")


def test_eval_ppl_cli_prints_json(model_dir: Path, tmp_path: Path) -> None:
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "ppl",
            str(text),
            "--mode",
            "sink",
            "--window",
            "60",
            "--max-tokens",
            "100",
            "--model",
            str(model_dir),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["tokens"] == 100 and figures["cache_tokens"] == 64 and figures["perplexity"] > 1


def test_modes_agree_before_eviction_and_differ_after() -> None:
    loaded = tiny_loaded("llama")
    short = {m: evaluate_perplexity(loaded, TEXT, m, 4, 252, 120).perplexity for m in EvalMode}
    assert max(short.values()) - min(short.values()) < 1e-3 * short[EvalMode.DENSE]
    long = {m: evaluate_perplexity(loaded, TEXT, m, 4, 28, 300).perplexity for m in EvalMode}
    assert long[EvalMode.SINK] != pytest.approx(long[EvalMode.WINDOW], rel=1e-4)
    assert long[EvalMode.SINK] != pytest.approx(long[EvalMode.RECOMPUTE], rel=1e-4)


def test_bench_prints_sink_against_recompute_for_a_random_model(
    tmp_path: Path, monkeypatch
) -> None:
    """The sink's figure is the step a worker's decoder runs for a lone stream."""
    steps = []
    step = decode_bench.decode_step
    monkeypatch.setattr(decode_bench, "decode_step", lambda *a: steps.append(a) or step(*a))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "vocab_size": VOCAB, "max_position_embeddings": 256,
    }))  # fmt: skip
    result = CliRunner().invoke(app, ["bench", "decode", "--random-config", str(config),
                                      "--device", "cpu", "--sizes", "32,64,512", "--tokens", "3",
                                      "--stream-lengths", "100,300"])  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    timed = [line.split() for line in lines if line.strip().startswith(("32 ", "64 "))]
    assert [row[0] for row in timed] == ["32", "64"] and all(row[3].endswith("x") for row in timed)
    assert any("512 skipped" in line for line in lines)
    memory = {
        line.split()[0]: line.split()[1:] for line in lines if line.strip()[:3] in ("100", "300")
    }
    assert memory["100"][0] == memory["300"][0]  # the sink cache does not grow with the stream
    assert float(memory["300"][1]) > float(memory["100"][1])  # a dense one would
    assert len(steps) == 2 * 4  # the warm-up and 3 timed steps at each cache size
    assert all(len(caches) == 1 and batched for _, caches, _, batched, *_ in steps)


def _bench_throughput(model_dir: Path, *options: str) -> Result:
    threads = torch.get_num_threads()
    try:
        return CliRunner().invoke(app, ["bench", "throughput", "--model", str(model_dir),
                                        "--device", "cpu", "--threads", "1", "--size", "40",
                                        "--steps", "2", *options])  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def test_bench_throughput_prints_batched_sequential_and_plain_side_by_side(
    model_dir: Path,
) -> None:
    result = _bench_throughput(model_dir, "--streams", "1,3")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "1 CPU threads" in lines[0] and "full cache of 40" in lines[0]
    assert lines[1].startswith("prefill float32") and "tokens/s" in lines[1]
    rows = [line.split() for line in lines[3:]]
    assert [row[:2] for row in rows] == [["float32", "1"], ["float32", "3"]]
    assert all(float(figure) > 0 for row in rows for figure in row[2:5])


def test_the_throughput_table_puts_llama_cpp_beside_float32_where_it_ran() -> None:
    from worker.tools.throughput_bench import Decode, Prefill, ThroughputReport

    report = ThroughputReport("m", "cpu", 2, 1024, 8, None)
    report.prefill = [Prefill("float32", 500.0, 450.0, 700.0), Prefill("bfloat16", 650.0, 600.0)]
    report.decode = [
        Decode("float32", 16, 120.0, 15.0, 40.0, 200.0, 720.0, 700.0, 2000.0),
        Decode("bfloat16", 16, 180.0, 20.0, 45.0, None, 360.0, 350.0, 1500.0),
    ]
    lines = report.lines()
    assert lines[1].endswith("llama.cpp 700 tokens/s") and "llama.cpp" not in lines[2]
    fp32, bf16 = (line.split() for line in lines[-2:])
    assert fp32[5] == "200.0" and fp32[8] == "0.60x"  # batched against llama.cpp
    assert bf16[5] == "-" and bf16[8] == "-"
    assert json.loads(json.dumps(report.to_dict()))["decode"][1]["llama_cpp"] is None


def test_eval_commentary_scores_what_run_writes_and_its_dump_alike(
    model_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "app.log"
    log.write_text("".join(f"12:00:{i:02d} ERROR request {i} failed: 503\n" for i in range(12)))
    run = CliRunner().invoke(app, run_arguments(log, tmp_path / "state", model_dir, 4))
    assert run.exit_code == 0, run.output
    dump = tmp_path / "commentary.jsonl"
    dump.write_text(run.stdout)
    same = run_arguments(log, tmp_path / "state", model_dir, 4)[5:]  # the model and policy
    scores = []
    for extra in ([], ["--commentary", str(dump)]):
        result = CliRunner().invoke(app, ["eval", "commentary", str(log), *same, *extra])
        assert result.exit_code == 0, result.output
        scores.append(json.loads(result.stdout.strip().splitlines()[-1]))
    written, dumped = scores
    assert written.pop("seconds_per_commentary") > 0
    assert dumped.pop("seconds_per_commentary") is None
    assert written == dumped and written["commentaries"] == 3
    assert 0 <= written["grounding"] <= 1 and 0 <= written["invention"] <= 1


def test_bench_throughput_json_splits_batches_and_compares_dtypes(model_dir: Path) -> None:
    result = _bench_throughput(
        model_dir, "--streams", "3", "--max-batch", "2", "--dtypes", "float32,bfloat16", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["max_batch"] == 2 and report["size"] == 40
    assert [row["dtype"] for row in report["prefill"]] == ["float32", "bfloat16"]
    decode = {row["dtype"]: row for row in report["decode"]}
    fp32, bf16 = decode["float32"], decode["bfloat16"]
    assert bf16["sink_cache_mb"] == pytest.approx(fp32["sink_cache_mb"] / 2)
    assert fp32["dense_cache_mb"] == pytest.approx(fp32["sink_cache_mb"] * 39 / 40)
    assert all(decode["float32"][path] > 0 for path in ("batched", "sequential", "transformers"))
