"""``python -m multitask.synth``: see multitask.data.synth."""
from multitask.data.synth import main

if __name__ == "__main__":
    main()
