if 'transformer' not in globals():
    from mage_ai.data_preparation.decorators import transformer
if 'test' not in globals():
    from mage_ai.data_preparation.decorators import test


@transformer
def combine_stats(total: int, squares: int, evens: int, *args, **kwargs) -> dict:
    """The fan-in: one positional argument per upstream block, in the order of this
    block's upstream_blocks (sum_values, sum_squares, count_evens)."""
    n = int(kwargs.get('n', 10))
    mean = total / n
    return {
        'n': n,
        'sum': total,
        'sum_of_squares': squares,
        'even_count': evens,
        'mean': mean,
        'variance': squares / n - mean ** 2,
    }


@test
def test_output(output, *args) -> None:
    assert output['variance'] >= 0, 'A negative variance means the inputs arrived out of order'
    assert output['even_count'] == output['n'] // 2
