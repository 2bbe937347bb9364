if 'transformer' not in globals():
    from mage_ai.data_preparation.decorators import transformer
if 'test' not in globals():
    from mage_ai.data_preparation.decorators import test


@transformer
def format_greeting(data: dict, *args, **kwargs) -> dict:
    repeat = int(kwargs.get('repeat', 1))
    message = ' '.join([data['message']] * repeat)
    if kwargs.get('shout'):
        message = message.upper()
    return dict(data, message=message, repeat=repeat)


@test
def test_output(output, *args) -> None:
    assert output['message'], 'Empty message'
