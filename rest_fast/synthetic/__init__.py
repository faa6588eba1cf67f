"""A synthetic action world in which REST visibly learns (the default demo), and its pretrained models.

* :mod:`~rest_fast.synthetic.world` — clips of one coloured shape doing one of eight actions, and the "web" corpus;
* :mod:`~rest_fast.synthetic.dataset` — the demo's training set as video files in class folders;
* :mod:`~rest_fast.synthetic.models` — the demo CLIP and demo BLIP as the trainer loads them (``blip=demo``);
* :mod:`~rest_fast.synthetic.pretrain` — the script that trains both, bit for bit from a seed.
"""
