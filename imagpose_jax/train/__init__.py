"""Training (spec section 6): stage filters, the min-SNR v-prediction objective, the sharded train state and
one jitted train step. Configurations live in `configs/stage{1,2,3}.py` (built by `train.config`)."""
