"""What `jointrank compress` prints: the scope table (params before/after per scope) appears exactly once."""

from conftest import tiny_model

from jointrank.cli import main


def test_compress_prints_the_scope_table_once(tmp_path, capsys):
    model_dir = tmp_path / "tiny-mistral"
    tiny_model("mistral").save_pretrained(model_dir)
    code = main(["compress", str(model_dir), "--qk", "joint", "--target", "0.1", "--scope", "decoder",
                 "--out", str(tmp_path / "out")])
    stdout = capsys.readouterr().out
    assert code == 0
    assert stdout.count("kept (after/before)") == 1, stdout
    assert stdout.count("decoder layers") == 1, stdout
