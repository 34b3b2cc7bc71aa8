"""One markdown table from per-checkpoint columns, shared by the stage-table scripts."""
from typing import Callable, Sequence


def print_columns(names: Sequence[str], column: Callable[[str], dict[str, str]],
                  missing: str = '-') -> None:
    """A row per key any column has (first-seen order), a column per name."""
    columns = {n: column(n) for n in names}
    keys = list(dict.fromkeys(k for c in columns.values() for k in c))
    print('| | ' + ' | '.join(names) + ' |')
    print('|---' * (len(names) + 1) + '|')
    for key in keys:
        print(f'| {key} | ' + ' | '.join(columns[n].get(key, missing) for n in names) + ' |')
