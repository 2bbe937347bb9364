if 'data_exporter' not in globals():
    from mage_ai.data_preparation.decorators import data_exporter


@data_exporter
def print_greeting(data: dict, *args, **kwargs) -> None:
    # Printed lines become the block run's log.
    print(data['message'])
