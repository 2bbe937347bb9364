import pandas as pd

if 'data_loader' not in globals():
    from mage_ai.data_preparation.decorators import data_loader
if 'test' not in globals():
    from mage_ai.data_preparation.decorators import test


@data_loader
def load_numbers(*args, **kwargs) -> pd.DataFrame:
    """The numbers 1..n (`n` is a pipeline variable)."""
    n = int(kwargs.get('n', 10))
    return pd.DataFrame({'value': range(1, n + 1)})


@test
def test_output(output, *args) -> None:
    assert output is not None, 'The output is undefined'
    assert output['value'].min() == 1
