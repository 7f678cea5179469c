"""The other methods of the field, run in the same pipeline as the CDCML variants (issue 7).

Each module is one method (see :mod:`imem.methods.base` for the contract); ``METHODS`` lists the ones the
``method@<name>`` stage can run. L3-Net, ACP-Net and CDCML's ablation rows are train-stage variants
(``train.variants``); SP-Net (:mod:`imem.methods.sp_net`, stage ``sp_net``) combines two of them.
"""

METHODS = ("mmva", "emo_clim", "cmer_cl")
