import pandas as pd

if 'transformer' not in globals():
    from mage_ai.data_preparation.decorators import transformer
if 'test' not in globals():
    from mage_ai.data_preparation.decorators import test


@transformer
def clean_orders(orders: pd.DataFrame, *args, **kwargs) -> pd.DataFrame:
    """Drop resent rows, rows with no price and returns (quantity <= 0); write every
    region the same way; add the order amount."""
    df = orders.drop_duplicates(subset='order_id', keep='first')
    df = df.dropna(subset=['unit_price'])
    df = df[df['quantity'] > 0].copy()
    df['region'] = df['region'].str.strip().str.title()
    df['order_date'] = pd.to_datetime(df['order_date'])
    df['quantity'] = df['quantity'].astype('int64')
    df['amount'] = (df['quantity'] * df['unit_price']).round(2)
    kwargs['logger'].info('Kept %d of %d rows', len(df), len(orders))
    return df.reset_index(drop=True)


@test
def test_no_bad_rows(output, *args) -> None:
    assert output['order_id'].is_unique, 'Duplicate orders remain'
    assert output['unit_price'].notna().all(), 'Rows without a price remain'
    assert (output['quantity'] > 0).all(), 'Returns remain'


@test
def test_regions_are_normalised(output, *args) -> None:
    assert set(output['region']) <= {'North', 'South', 'East', 'West'}, set(output['region'])
