class CheckpointCallback:
    pass
def make_dataset():
    pass
