import pandas as pd

if 'transformer' not in globals():
    from mage_ai.data_preparation.decorators import transformer
if 'test' not in globals():
    from mage_ai.data_preparation.decorators import test


@transformer
def aggregate_revenue_by_region(orders: pd.DataFrame, *args, **kwargs) -> pd.DataFrame:
    summary = (
        orders.groupby('region', as_index=False)
        .agg(orders=('order_id', 'count'), units=('quantity', 'sum'), revenue=('amount', 'sum'))
        .sort_values(['revenue', 'region'], ascending=[False, True])
        .reset_index(drop=True)
    )
    summary['revenue'] = summary['revenue'].round(2)
    return summary


@test
def test_one_row_per_region(output, *args) -> None:
    assert output['region'].is_unique
    assert (output['revenue'] > 0).all()
