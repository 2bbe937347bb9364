import os

import pandas as pd

if 'data_exporter' not in globals():
    from mage_ai.data_preparation.decorators import data_exporter


@data_exporter
def export_revenue_csv(summary: pd.DataFrame, *args, **kwargs) -> None:
    """Write the summary under the data directory. `export_dir` (a runtime variable)
    chooses another folder."""
    export_dir = kwargs.get('export_dir') or os.path.join(
        os.environ.get('MILLRACE_DATA_DIR', 'var/data'), 'exports', 'example_etl',
    )
    os.makedirs(export_dir, exist_ok=True)
    path = os.path.join(export_dir, 'revenue_by_region.csv')
    # Written to a temporary name and renamed, so a reader never sees half a file.
    tmp = f'{path}.tmp'
    summary.to_csv(tmp, index=False)
    os.replace(tmp, path)
    kwargs['logger'].info('Wrote %d rows to %s', len(summary), path)
