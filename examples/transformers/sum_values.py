import pandas as pd

if 'transformer' not in globals():
    from mage_ai.data_preparation.decorators import transformer


@transformer
def sum_values(numbers: pd.DataFrame, *args, **kwargs) -> int:
    return int(numbers['value'].sum())
