class TFGenerationMixin:
    pass
