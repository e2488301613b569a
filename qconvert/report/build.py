"""Gather the outputs' reports (scoring them against the base where no stored evaluation matches) and
write the page."""

from __future__ import annotations

from pathlib import Path

from qconvert.report.data import find_evaluation, load, record_evaluation, report_file
from qconvert.report.page import Output, render


def page_file(output: Path) -> Path:
    return report_file(output).with_name(report_file(output).name.replace("report.json", "report.html"))


def build(output: Path, compare: list[Path], base: str | None, html: Path | None, dataset: str = "heldout",
          samples: int = 40, seq_len: int = 512, device: str = "auto") -> tuple[Path, list[Output]]:
    from qconvert.eval.run import score
    from qconvert.output import staged_file

    outputs = []
    for path in [output, *compare]:
        report = load(path)
        evaluation = find_evaluation(report, base, dataset, samples, seq_len)
        if evaluation is None and base is not None:
            evaluation = score(str(path), base, dataset, samples, seq_len, device)
            record_evaluation(path, evaluation)
        outputs.append(Output(path, report, evaluation))
    target = html or page_file(output)
    with staged_file(target, overwrite=True) as tmp:
        tmp.write_text(render(outputs))
    return target, outputs
