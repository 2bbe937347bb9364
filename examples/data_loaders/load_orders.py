"""Raw orders, as an extract from a shop database would give them.

The rows are generated here, from the row number alone, instead of being read from a
CSV shipped next to this file: a block runs from the database, with no file path of its
own, in whatever directory the worker was started, so a relative path would break as
soon as the worker runs elsewhere, and an absolute one would tie the project to one
machine. Pure arithmetic (no random generator) gives the same rows on every machine and
every numpy/pandas version, so the results can be checked exactly. The data carries the
dirt of a real extract for the cleaning step: rows sent twice, missing prices, zero and
negative quantities (returns), and region names typed in three different ways.
"""
from datetime import date, timedelta

import pandas as pd

if 'data_loader' not in globals():
    from mage_ai.data_preparation.decorators import data_loader
if 'test' not in globals():
    from mage_ai.data_preparation.decorators import test

REGIONS = ['north', 'south', 'east', 'west']
PRODUCTS = ['anvil', 'bellows', 'chisel', 'drill', 'ember']
FIRST_DAY = date(2024, 1, 1)


def _region_as_typed(i: int) -> str:
    region = REGIONS[i % len(REGIONS)]
    style = (i // len(REGIONS)) % 3
    if style == 1:
        return f'  {region.upper()} '
    if style == 2:
        return region.capitalize()
    return region


@data_loader
def load_orders(*args, **kwargs) -> pd.DataFrame:
    rows = int(kwargs.get('rows', 200))
    records = []
    for i in range(rows):
        records.append({
            'order_id': 1000 + i,
            'order_date': (FIRST_DAY + timedelta(days=i % 90)).isoformat(),
            'region': _region_as_typed(i),
            'product': PRODUCTS[(i * 7) % len(PRODUCTS)],
            'quantity': (i * 3) % 7 - 1,
            'unit_price': None if i % 17 == 0 else 5 + ((i * 13) % 40) * 0.5,
        })
    # Every 25th order was sent twice by the source system.
    records.extend(dict(records[i]) for i in range(0, rows, 25))
    df = pd.DataFrame.from_records(records)
    kwargs['logger'].info('Loaded %d raw order rows', len(df))
    return df


@test
def test_output(output, *args) -> None:
    assert output is not None, 'The output is undefined'
    assert {'order_id', 'region', 'quantity', 'unit_price'} <= set(output.columns)
    assert len(output) > 0, 'No rows were loaded'
