"""How the benchmark sections report: Markdown tables, one page, one figure."""
import datetime
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch

from .settings import WORKLOADS, BenchmarkSettings
from .timing import device_name


def fmt_time(stats: dict) -> str:
    """``'median (min-max)'`` seconds."""
    return f'{stats["median"]:.3f} ({stats["min"]:.3f}-{stats["max"]:.3f})'


@dataclass
class Table:
    """One titled Markdown table of a report, with optional paragraphs around it.

    Args:
        title (str): The ``##`` heading.
        columns (Sequence[str]): The column names.
        rows (list[list[str]]): The cells; see :meth:`add`.
        intro (str): A paragraph between the heading and the table. Defaults to none.
        notes (Sequence[str]): Paragraphs after the table. Defaults to none.
    """
    title: str
    columns: Sequence[str]
    rows: List[List[str]] = field(default_factory=list)
    intro: str = ''
    notes: Sequence[str] = ()

    def add(self, *cells: Any) -> None:
        """Append a row (cells are written with ``str``)."""
        if len(cells) != len(self.columns):
            raise ValueError(f'{self.title}: a row of {len(cells)} cells for '
                             f'{len(self.columns)} columns')
        self.rows.append([str(c) for c in cells])

    def lines(self) -> List[str]:
        """The table as Markdown lines, ending with an empty line."""
        lines = [f'## {self.title}', '']
        if self.intro:
            lines += [self.intro, '']
        lines += ['| ' + ' | '.join(self.columns) + ' |', '|' + '---|' * len(self.columns)]
        lines += ['| ' + ' | '.join(row) + ' |' for row in self.rows]
        lines.append('')
        for note in self.notes:
            lines += [note, '']
        return lines


@dataclass
class Report:
    """What one benchmark section returns.

    Args:
        tables (list[Table]): Its tables (none when it measured nothing here).
        data (Any): The measurements themselves, e.g. for a figure. Defaults to None.
    """
    tables: List[Table]
    data: Any = None


def benchmark_markdown(reports: Dict[str, Report], settings: BenchmarkSettings,
                       seconds: float, command: str) -> str:
    """The benchmark page: a heading, how it was measured, every section's tables.

    Args:
        reports (dict[str, Report]): The sections' reports, in the order of the page.
        settings (BenchmarkSettings): What was measured.
        seconds (float): How long the run took.
        command (str): The command that ran it, quoted in the page.

    Returns:
        str: Markdown.
    """
    lines = ['# mmreparam benchmark', '',
             f'Measured {datetime.date.today()} on {device_name(settings.device)} '
             f'({settings.device}), torch {torch.__version__}, median of {settings.repeats} '
             f'runs (min-max), in {seconds / 60:.1f} min with `{command}`.', '']
    for report in reports.values():
        for table in report.tables:
            lines += table.lines()
    return '\n'.join(lines)


def plot_training_cost(rows: Dict[tuple, dict], path: str) -> None:
    """Bar charts of training step time and peak memory relative to ``base`` per block type
    and workload (the ``train`` section's data), written to ``path`` (PNG)."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    workloads = sorted({w for w, _ in rows}, key=list(WORKLOADS).index)
    reparams = list(dict.fromkeys(r for _, r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / len(workloads)
    for i, workload in enumerate(workloads):
        base = rows[(workload, 'base')]
        xs = [j + i * width for j in range(len(reparams))]
        batch, size = WORKLOADS[workload]
        label = f'batch {batch} @ {size}'
        axes[0].bar(xs, [rows[(workload, r)]['median'] / base['median'] for r in reparams],
                    width, label=label)
        axes[1].bar(xs, [rows[(workload, r)]['peak_memory'] / base['peak_memory']
                         for r in reparams], width, label=label)
    for ax, title in zip(axes, ('training step time vs base', 'peak memory vs base')):
        # Slanted names: seven block types do not fit side by side at this width.
        ax.set_xticks([j + width * (len(workloads) - 1) / 2 for j in range(len(reparams))])
        ax.set_xticklabels(reparams, rotation=30, ha='right')
        ax.axhline(1.0, color='grey', lw=0.8)
        ax.set_title(title)
    # One legend for both, above the plots, where it covers no bar.
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle('ResNet-50 training cost by block type (mmreparam)')
    fig.legend(handles, labels, loc='upper center', ncol=len(workloads), frameon=False,
               bbox_to_anchor=(0.5, 0.945))
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    fig.savefig(path, dpi=110, format='png')
    plt.close(fig)


__all__ = ['Table', 'Report', 'fmt_time', 'benchmark_markdown', 'plot_training_cost']
