if 'data_loader' not in globals():
    from mage_ai.data_preparation.decorators import data_loader
if 'test' not in globals():
    from mage_ai.data_preparation.decorators import test


@data_loader
def load_greeting_defaults(*args, **kwargs) -> dict:
    """Runtime variables arrive in kwargs: the pipeline's `variables` are the defaults,
    `--runtime-vars` (or a trigger's variables) override them."""
    greeting = kwargs['greeting']
    name = kwargs['name']
    kwargs['logger'].info('Greeting %s for the run of %s', name, kwargs.get('ds'))
    return {'greeting': greeting, 'name': name, 'message': f'{greeting}, {name}!'}


@test
def test_output(output, *args) -> None:
    assert output['message'].endswith('!')
