"""The student's forward gives freed heap memory back after every few decoder layers, and only
inside the block (sdcli.training.memory.heap_trimmed_between_layers)."""

import torch

import sdcli.training.memory as memory


class Decoder(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_trims_after_every_fifth_layer_inside_the_block_only(monkeypatch):
    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    decoder = Decoder(12)
    with memory.heap_trimmed_between_layers(decoder):
        decoder(torch.randn(2, 4)).sum().backward()
        assert len(trims) == (2 if memory._libc() else 0)  # after layers 5 and 10
    decoder(torch.randn(2, 4))
    assert len(trims) == (2 if memory._libc() else 0)
    assert not any(layer._forward_hooks for layer in decoder.layers)


def test_a_model_without_a_layer_list_is_left_alone(monkeypatch):
    trims = []
    monkeypatch.setattr(memory, "trim_heap", lambda: trims.append(1))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with memory.heap_trimmed_between_layers(model):
        model(torch.randn(1, 4))
    assert trims == []
