import pandas as pd

if 'transformer' not in globals():
    from mage_ai.data_preparation.decorators import transformer


@transformer
def sum_squares(numbers: pd.DataFrame, *args, **kwargs) -> int:
    return int((numbers['value'] ** 2).sum())
