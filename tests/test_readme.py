"""The README's real-data tables are generated from the committed result files and must match them."""

import json
from pathlib import Path

from cli_runs import benchmark
from conftest import PROJECT


def test_readme_tables_match_the_committed_result_files():
    module = benchmark("readme_results")
    readme = (PROJECT / "README.md").read_text()
    assert module.BEGIN in readme and module.END in readme
    assert module.updated(readme) == readme, "README is stale: run .venv/bin/python benchmarks/readme_results.py"


def _write_domain(folder: Path, adapter: float) -> None:
    folder.mkdir(parents=True)
    variant = {
        "variant": "train.epochs=2",
        "overrides": ["train.epochs=2"],
        "n": 100,
        "base": 0.41,
        "score": 0.52,
        "delta": 0.11,
        "ci95": [0.03, 0.19],
        "steps": 120,
        "wall_time_s": 1800.0,
    }
    sweep = {"task": "pubmedqa", "winner": "train.epochs=2", "variants": [variant], "select_with": []}
    task = {"n": 500, "metric": "accuracy", "base": 0.538, "adapter": adapter, "delta": adapter - 0.538}
    task["ci95"] = [task["delta"] - 0.05, task["delta"] + 0.05]
    (folder / "sweep.json").write_text(json.dumps(sweep))
    (folder / "eval.json").write_text(json.dumps({"tasks": {"pubmedqa": task}}))


def test_tables_are_rendered_from_the_files(tmp_path):
    module = benchmark("readme_results")
    _write_domain(tmp_path / "medical", adapter=0.612)
    text = module.render(tmp_path)
    assert (
        "| medical | `train.epochs=2` | pubmedqa (500) | accuracy | 0.538 | 0.612 | **+0.074** | [+0.024, +0.124] |"
    ) in text
    assert (
        "| medical | `train.epochs=2` (winner) | pubmedqa (100) | 0.410 | 0.520 | +0.110 | [+0.030, +0.190] | 120 "
        "| 30 min |"
    ) in text
    assert "Not run yet: legal, finance" in text
    # a winner chosen on a subset and trained again without it shows that final model's own validation score
    sweep = json.loads((tmp_path / "medical" / "sweep.json").read_text())
    sweep["select_with"] = ["data.sources.0.limit=120"]
    final = {"n": 100, "base": 0.41, "score": 0.47, "delta": 0.06, "ci95": [-0.02, 0.14], "steps": 480}
    sweep["final_validation"] = {**final, "wall_time_s": 3600.0}
    (tmp_path / "medical" / "sweep.json").write_text(json.dumps(sweep))
    assert (
        "| medical | `train.epochs=2` trained without the subset (the reported model) | pubmedqa (100) | 0.410 | "
        "0.470 | +0.060 | [-0.020, +0.140] | 480 | 60 min |"
    ) in module.render(tmp_path)
    # a changed result file changes the section (so the README test fails until it is regenerated);
    # a delta whose interval includes 0 is not bold
    task = {"n": 500, "metric": "accuracy", "base": 0.538, "adapter": 0.54, "delta": 0.002, "ci95": [-0.03, 0.034]}
    (tmp_path / "medical" / "eval.json").write_text(json.dumps({"tasks": {"pubmedqa": task}}))
    assert "| 0.538 | 0.540 | +0.002 | [-0.030, +0.034] |" in module.render(tmp_path)
    # an interval over documents says how many
    (tmp_path / "medical" / "eval.json").write_text(json.dumps({"tasks": {"pubmedqa": {**task, "groups": 123}}}))
    assert "| pubmedqa (500 in 123 docs) | accuracy |" in module.render(tmp_path)


def test_the_sample_section_is_rendered_from_the_sample_runs_files(tmp_path):
    module = benchmark("readme_results")
    task = {"n": 10, "metric": "accuracy", "base": 0.6, "adapter": 0.7, "delta": 0.1, "ci95": [0.0, 0.3]}
    gguf = {"outtype": "f16", "verifier": "llama.cpp (x)", "max_abs_logit_diff": 0.0642, "threshold": 0.3}
    files = {
        "run.json": {"steps": 12, "data": {"train_rows": 23}},
        "eval.json": {"tasks": {"pubmedqa": task}},
        "merge.json": {"max_abs_logit_diff": 6.58e-05, "threshold": 0.001},
        "export.json": {"files": {"m-f16.gguf": {**gguf, "greedy_text_agreement": 1.0}}},
    }
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    text = module.render_sample(tmp_path)
    assert text.startswith("`make recipe=medical` trains 12 steps on the sample's 23 training questions")
    assert "| pubmedqa | accuracy | 10 | 0.600 | 0.700 | +0.100 | [+0.000, +0.300] |" in text
    assert "merged model): 6.58e-05 (threshold 0.001)" in text
    assert "llama.cpp (x): max |Δlogit| 0.064 (threshold 0.3), greedy text agreement 1.00." in text


def test_the_gguf_table_lists_every_exported_type_with_the_figures_of_its_check(tmp_path):
    module = benchmark("readme_results")
    f16 = {"outtype": "f16", "bytes": 270885632, "verifier": "llama.cpp (x)", "threshold": 0.3}
    f16.update(max_abs_logit_diff=0.0642, top1_agreement=1.0)
    q4 = {"outtype": "q4_k_m", "bytes": 105500000, "heldout_rows": 8}
    q4.update(top1_agreement_with_f16=0.869, perplexity_ratio=1.0672)
    (tmp_path / "export.json").write_text(json.dumps({"files": {"m-q4_k_m.gguf": q4, "m-f16.gguf": f16}}))
    rows = module.render_gguf(tmp_path).splitlines()[2:]
    assert rows == [
        "| f16 | 270.9 MB | the merged model, in llama.cpp (x) | 0.064 (0.3) | 1.000 | |",
        "| q4_k_m | 105.5 MB | its f16 file in llama.cpp, 8 held-out rows | | 0.869 | x1.07 |",
    ]


def test_the_console_example_is_what_the_sample_run_printed(tmp_path):
    module = benchmark("readme_results")
    steps = [f"{{'loss': '{loss}', 'epoch': '{epoch}'}}" for epoch, loss in enumerate((2.6, 3.3, 2.1, 1.9))]
    printed = ["$ finetune run medical", *steps, "trained: runs/x  steps=4"]
    (tmp_path / "console.txt").write_text("\n".join(printed) + "\n")
    assert module.render_console(tmp_path).splitlines() == [
        "```",
        "$ finetune run medical",
        "{'loss': '2.6', 'epoch': '0'}",
        "...",
        "{'loss': '1.9', 'epoch': '3'}",
        "trained: runs/x  steps=4",
        "```",
    ]


def test_the_continued_pretraining_figures_are_rendered_from_its_runs_files(tmp_path):
    module = benchmark("readme_results")
    task = {"n": 10, "metric": "perplexity", "base": 14.57, "adapter": 11.8, "delta": -2.77, "ci95": [-3.43, -2.23]}
    (tmp_path / "run.json").write_text(json.dumps({"steps": 12, "epochs": 3.0, "data": {"train_rows": 23}}))
    (tmp_path / "eval.json").write_text(json.dumps({"tasks": {"abstracts": task}}))
    text = module.render_cpt(tmp_path)
    assert "(23 training abstracts, 3 epochs, 12 steps;" in text
    assert "| abstracts | perplexity | 10 | 14.570 | 11.800 | **-2.770** | [-3.430, -2.230] |" in text


def test_a_variant_of_yaml_overrides_is_named_in_the_table_and_spelled_out_on_one_line(tmp_path):
    module = benchmark("readme_results")
    _write_domain(tmp_path / "medical", adapter=0.612)
    sweep_file = tmp_path / "medical" / "sweep.json"
    sweep = json.loads(sweep_file.read_text())
    sweep["winner"] = sweep["variants"][0]["variant"] = "sources=1"
    sweep["variants"][0]["overrides"] = ["data.sources=[{path: a.json,\n    reader: pubmedqa}]"]
    sweep_file.write_text(json.dumps(sweep))
    text = module.render(tmp_path)
    assert "| medical | `sources=1` | pubmedqa (500) |" in text
    assert "The variants: medical: `sources=1` = `data.sources=[{path: a.json, reader: pubmedqa}]`." in text


def test_the_speed_section_is_rendered_from_the_named_runs_and_says_whether_the_goal_is_met(tmp_path):
    module = benchmark("readme_results")
    names = [module.SPEED_RUNS["comparison"], *module.SPEED_RUNS["levers"]]
    names += [module.SPEED_RUNS[key] for key in ("breakdown", "bf16", "profile", "scaling", "attention")]
    for name in names:
        (tmp_path / name).write_text((module.SPEED / name).read_text())
    comparison_file = tmp_path / module.SPEED_RUNS["comparison"]
    comparison = json.loads(comparison_file.read_text())
    by_name = {r["variant"]: r for r in comparison["results"]}
    assert "are not met" in module.render_speed(tmp_path)
    # ours at 2.5x the tuned baseline's tokens/s and 65% utilization: the generated sentence follows the file
    by_name["ours"]["effective_tokens_per_s"] = 2.5 * by_name["baseline-tuned"]["effective_tokens_per_s"]
    by_name["ours"]["utilization_pct"] = 65.0
    comparison_file.write_text(json.dumps(comparison))
    text = module.render_speed(tmp_path)
    assert "The toolkit trains at 2.50x the tuned TRL's speed" in text and "are met" in text
    # the profile's bound is total over matmul time
    profile = json.loads((tmp_path / module.SPEED_RUNS["profile"]).read_text())
    profile["seconds"] = {"matmul": 6.0, "attention": 2.0, "dropout": 1.0, "other": 1.0}
    (tmp_path / module.SPEED_RUNS["profile"]).write_text(json.dumps(profile))
    text = module.render_speed(tmp_path)
    assert "matmul 60%, attention 20%, dropout 10%, other 10%" in text and "more than 1.67x faster" in text
    # the matmuls by kind against the rate measured beside them, and the three largest other ops
    profile["matmuls"] = {"dense": {"s": 5.0, "gflop_per_s": 150.0}, "lora": {"s": 1.0, "gflop_per_s": 50.0}}
    profile["matmul_gflops"]["float32"] = 200.0
    profile["largest_other"] = {"aten::mul": 0.5, "aten::where": 0.3, "aten::add": 0.1, "aten::ge": 0.05}
    profile["optimizer"] = {"name": "AdamW", "fused": False, "s": 0.2}
    (tmp_path / module.SPEED_RUNS["profile"]).write_text(json.dumps(profile))
    assert (
        "The dense matmuls run at 150.0 GFLOP/s, 0.75x the dense fp32 rate measured beside them, and LoRA's rank-16 "
        "products (10% of the time) at 50.0; the largest of the other ops are aten::mul (5%), aten::where (3%), "
        "aten::add (1%); the optimizer's steps (AdamW, transformers' default) take 2.0% of the time,"
    ) in module.render_speed(tmp_path)
    # bf16: the ratios follow the file, and the warning cites the profile's CPU only where its bf16 was slower
    bf16_file = tmp_path / module.SPEED_RUNS["bf16"]
    bf16 = json.loads(bf16_file.read_text())
    by_name = {r["variant"]: r for r in bf16["results"]}
    by_name["ours-bf16"]["effective_tokens_per_s"] = 2 * by_name["baseline-tuned-bf16"]["effective_tokens_per_s"]
    bf16_file.write_text(json.dumps(bf16))
    assert "the toolkit stays at 2.00x" in module.render_speed(tmp_path)
    by_name["ours-eager-bf16"]["effective_tokens_per_s"] = 3 * by_name["ours-bf16"]["effective_tokens_per_s"]
    bf16_file.write_text(json.dumps(bf16))
    assert "trains the rows above at 3.00x sdpa's speed in bf16" in module.render_speed(tmp_path)
    by_name["ours-torch-dropout-bf16"]["effective_tokens_per_s"] = by_name["ours-bf16"]["effective_tokens_per_s"] / 1.25
    bf16_file.write_text(json.dumps(bf16))
    assert "faster in fp32 and 1.25x in bf16 than PEFT's own masks" in module.render_speed(tmp_path)
    profile["matmul_gflops"] = {"float32": 100.0, "bfloat16": 50.0}
    (tmp_path / module.SPEED_RUNS["profile"]).write_text(json.dumps(profile))
    assert "(the profile's CPU above: 50.0 GFLOP/s in bf16 against 100.0 in fp32)" in module.render_speed(tmp_path)
    profile["matmul_gflops"] = {"float32": 100.0, "bfloat16": 200.0}
    (tmp_path / module.SPEED_RUNS["profile"]).write_text(json.dumps(profile))
    assert "runs it far slower." in module.render_speed(tmp_path)
    # torch.compile once compiled: steps after the first from the logged step times, the first from the rest
    compile_file = tmp_path / module.SPEED_RUNS["levers"][1]
    compile_run = json.loads(compile_file.read_text())
    by_name = {r["variant"]: r for r in compile_run["results"]}
    steps = len(by_name["ours"]["losses"])
    by_name["ours"].update(step_s=[[2.0] * (steps - 1)], train_runtime_s=[2.0 * (steps - 1) + 6])
    by_name["ours-compile"].update(step_s=[[1.0] * (steps - 1)], train_runtime_s=[1.0 * (steps - 1) + 10])
    compile_file.write_text(json.dumps(compile_run))
    assert (
        f"steps 2 to {steps}, each timed from one logged loss to the next): 1.0 s a step against ours' 2.0 s, 2.00x "
        "ours' speed; its first step, where it compiles, takes 4 s longer than ours'."
    ) in module.render_speed(tmp_path)
    # levers measured for both trainers (two processes, eager attention in float32): speed, step times (over every
    # repeat) and memory, each against the same trainer without the lever
    for index, lever, without in ((2, "-ddp2", "in one process"), (4, "-eager", "with sdpa")):
        lever_file = tmp_path / module.SPEED_RUNS["levers"][index]
        run = json.loads(lever_file.read_text())
        by_name = {r["variant"]: r for r in run["results"]}
        for one, speed in (("ours", 30.0), ("baseline-tuned", 20.0)):
            by_name[one].update(effective_tokens_per_s=speed, step_s=[[2.0, 4.0], [3.0, 3.0]], peak_rss_mb=1000.0)
            by_name[f"{one}{lever}"].update(
                effective_tokens_per_s=speed * 1.5, step_s=[[1.0, 2.0], [1.5, 1.5]], peak_rss_mb=2100.0
            )
        lever_file.write_text(json.dumps(run))
        assert (
            f"the toolkit at 1.50x its speed {without} (steps after the first 1.5 s against 3.0 s), at 2.10x the "
            f"memory; the tuned TRL at 1.50x its speed {without}"
        ) in module.render_speed(tmp_path)


def test_each_real_recipe_trains_what_its_committed_sweep_chose():
    """`make recipe=real/NAME` must train the winner the README reports, not a variant that lost on validation."""
    from finetune.recipe import load as load_recipe

    sweeps = sorted((PROJECT / "benchmarks" / "results" / "real").glob("*/sweep.json"))
    assert sweeps
    for path in sweeps:
        sweep = json.loads(path.read_text())
        winner = next(v for v in sweep["variants"] if v["variant"] == sweep["winner"])
        name = path.parent.name
        recipe = load_recipe(f"real/{name}")
        assert recipe == load_recipe(f"real/{name}", winner["overrides"]), (
            f"recipes/real/{name}.yaml differs from its sweep's winner {sweep['winner']}: set {winner['overrides']}"
        )


def test_committed_intervals_follow_from_their_per_example_records():
    """Every committed eval.json (real data and the shipped samples) keeps each example's scores, and its intervals
    are those its records give, with the questions of one document resampled together."""
    from finetune.eval.metrics import mean, paired_bootstrap

    checked = []
    for path in sorted((PROJECT / "benchmarks" / "results").glob("*/*/eval.json")):
        result = json.loads(path.read_text())
        for name, task in result["tasks"].items():
            records = task["examples"]
            base, adapter = ([e["scores"][who] for e in records] for who in ("base", "adapter"))
            groups = [e["group"] for e in records]
            assert (len(records), len(set(groups))) == (task["n"], task["groups"])
            assert (mean(base), mean(adapter)) == (task["base"], task["adapter"])
            resamples, seed = result["bootstrap"]["resamples"], result["bootstrap"]["seed"]
            assert list(paired_bootstrap(base, adapter, resamples, seed, groups)) == task["ci95"]
            checked.append(f"{path.parent.parent.name}/{path.parent.name}/{name}")
    assert {task.rsplit("/", 1)[0] for task in checked} == {
        "real/medical",
        "real/legal",
        "real/finance",
        "sample/medical",
        "sample/medical-cpt",
    }
