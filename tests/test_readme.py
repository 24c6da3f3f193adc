"""Every Python code block of README.md runs as written on the CPU (lines marked "# GPU only" skipped)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_has_python_blocks_and_marks_gpu_lines():
    blocks = python_blocks()
    assert len(blocks) >= 2
    assert any("# GPU only" in b for b in blocks)


def test_every_readme_python_block_runs_on_the_cpu(tmp_path):
    (tmp_path / "data").symlink_to(ROOT / "data")  # the README's relative paths, outputs in a temporary folder
    for i, block in enumerate(python_blocks()):
        code = "\n".join(line for line in block.splitlines() if "# GPU only" not in line)
        script = tmp_path / f"block{i}.py"
        script.write_text(code)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
        run = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=600)
        assert run.returncode == 0, f"README block {i} failed:\n{code}\n--- stderr:\n{run.stderr[-3000:]}"
    assert (tmp_path / "report.html").exists() and (tmp_path / "results.jsonl").exists()


# Files the README names that a command writes where the reader runs it, not results kept in the repository.
WRITTEN_BY_THE_READER = {"report.html", "results.jsonl"}


def test_every_result_file_the_readme_cites_is_in_the_repository():
    """Each `name.json` / `.log` / `.jsonl` / `.html` the README cites as a measurement lies in data/benchmarks (or at
    the path it gives), so that no claim points at a file a later change removed."""
    text = (ROOT / "README.md").read_text()
    names = set(re.findall(r"`([A-Za-z][A-Za-z0-9_./\-]*\.(?:json|log|jsonl|html))`", text)) - WRITTEN_BY_THE_READER
    assert len(names) > 50  # the README's results tables cite many
    missing = sorted(n for n in names if not (ROOT / "data" / "benchmarks" / n).exists() and not (ROOT / n).exists())
    assert not missing, f"README cites files that are not in the repository: {missing}"
