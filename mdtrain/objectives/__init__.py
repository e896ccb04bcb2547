"""The math: noise schedules, objectives (MDLM, MD4, GenMD4, D3PM, SEDD, AR) and samplers, as pure tensor functions."""
