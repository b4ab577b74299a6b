from __future__ import annotations

import os

from readmoe.io import atomic_save_figure, atomic_write_json, command_line


def test_atomic_writes_leave_no_temp_files_and_readable_modes(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"x": 1})
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1], [1, 0])
    atomic_save_figure(fig, tmp_path / "f.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "f.png"]
    assert (tmp_path / "f.png").read_bytes().startswith(b"\x89PNG")
    assert os.stat(tmp_path / "a.json").st_mode & 0o044


def test_write_results_writes_json_and_markdown(tmp_path, capsys):
    import json

    from readmoe.io import write_results

    paths = write_results(tmp_path / "new", "bench", {"speedup": 1.5}, "# Bench")
    assert [p.name for p in paths] == ["bench.json", "bench.md"]
    assert json.loads(paths[0].read_text()) == {"speedup": 1.5}
    assert paths[1].read_text() == "# Bench\n" and "# Bench" in capsys.readouterr().out


def test_command_line_is_rerunnable_from_the_repository_root(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    argv = [str(tmp_path / "benchmarks" / "x.py"), "--name", "a b", "--rounds", "1", "2"]
    assert command_line(argv) == "python benchmarks/x.py --name 'a b' --rounds 1 2"
    assert command_line(["/elsewhere/x.py"]) == "python /elsewhere/x.py"
