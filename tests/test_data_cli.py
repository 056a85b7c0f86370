"""`finetune data ...`: what a user sees before training."""

from __future__ import annotations

from finetune.cli import main


def test_preview_marks_trained_spans_and_counts_tokens(capsys, embedded_dir):
    assert main(["data", "preview", "medical", "-n", "1"]) == 0
    out = capsys.readouterr().out
    first_row = out.split("── row 0: ")[1].split("\n── ")[0]
    # The trained span is exactly the assistant turn: answer, rationale and the end-of-turn token.
    trained = first_row.split("⟦", 1)[1].split("⟧", 1)[0]
    assert trained.split("\n")[0] in ("yes", "no", "maybe")
    assert trained.endswith("<|im_end|>")
    assert first_row.count("⟦") == 1
    assert "<|im_start|>user" in first_row.split("⟦")[0]
    assert "── 23 rows, 0 duplicates removed, 0 longer than max_length=768" in out
    histogram = out.split("tokens per row:\n")[1].splitlines()
    assert sum(int(line.split()[-1]) for line in histogram) == 23


def test_info_names_readers_licenses_and_flags_non_commercial_sources(capsys, tmp_path):
    recipe = tmp_path / "mixed.yaml"
    recipe.write_text(
        "data:\n  sources:\n"
        "    - {path: datasets/medical/pubmedqa/ori_pqal.json, reader: pubmedqa}\n"
        "    - {path: datasets/finance/phrasebank_sample.txt, reader: phrasebank}\n"
    )
    assert main(["data", "info", str(recipe)]) == 0
    out = capsys.readouterr().out
    pubmedqa, phrasebank = out.split("datasets/finance/phrasebank_sample.txt")
    assert "reader: pubmedqa (mcq rows), split: train, license: MIT" in pubmedqa and "WARNING" not in pubmedqa
    assert "WARNING: this source's license forbids commercial use" in phrasebank


def test_readers_lists_every_reader(capsys):
    from finetune.data.readers import READERS

    assert main(["data", "readers"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == sorted(READERS)
