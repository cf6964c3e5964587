"""Flow: the cycle of steps, restart="epoch", and Handoff, each against the hand-written loop it ports."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_changed, assert_same_weights
from torch import nn

from trainflow import Flow, Step, Trainer
from trainflow.flow import Handoff

LATENT, PIXELS, BATCH = 4, 6, 5


def gan_nets(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    generator = nn.Sequential(nn.Linear(LATENT, 8), nn.ReLU(), nn.Linear(8, PIXELS), nn.Tanh())
    critic = nn.Sequential(nn.Linear(PIXELS, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
    return generator, critic


def images(batches: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(BATCH, PIXELS, generator=g) * 2 - 1, torch.zeros(BATCH)) for _ in range(batches)]


# ------------------------------------------------------------------------------ PyTorch-GAN's WGAN-GP

N_CRITIC, LAMBDA_GP = 5, 10.0


def compute_gradient_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """PyTorch-GAN's implementations/wgan_gp/wgan_gp.py, for flat images."""
    alpha = torch.rand(real.size(0), 1)
    interpolates = (alpha * real + ((1 - alpha) * fake)).requires_grad_(True)
    d_interpolates = D(interpolates)
    gradients = torch.autograd.grad(
        outputs=d_interpolates, inputs=interpolates, grad_outputs=torch.ones(real.shape[0], 1),
        create_graph=True, retain_graph=True, only_inputs=True,
    )[0]
    return ((gradients.view(gradients.size(0), -1).norm(2, dim=1) - 1) ** 2).mean()


def wgan_gp_by_hand(data, epochs: int):
    generator, discriminator = gan_nets()
    optimizer_G = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    optimizer_D = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    torch.manual_seed(7)
    for _ in range(epochs):
        for i, (imgs, _) in enumerate(data):
            real_imgs = imgs
            optimizer_D.zero_grad()
            z = torch.randn(imgs.shape[0], LATENT)
            fake_imgs = generator(z)
            real_validity = discriminator(real_imgs)
            fake_validity = discriminator(fake_imgs)
            gradient_penalty = compute_gradient_penalty(discriminator, real_imgs.data, fake_imgs.data)
            d_loss = -torch.mean(real_validity) + torch.mean(fake_validity) + LAMBDA_GP * gradient_penalty
            d_loss.backward()
            optimizer_D.step()
            optimizer_G.zero_grad()
            if i % N_CRITIC == 0:  # the generator every n_critic batches of the epoch, on the critic's z
                fake_imgs = generator(z)
                fake_validity = discriminator(fake_imgs)
                g_loss = -torch.mean(fake_validity)
                g_loss.backward()
                optimizer_G.step()
    return generator, discriminator


def wgan_gp_declarative(data, epochs: int, restart: str = "epoch", **fit):
    generator, discriminator = gan_nets()
    optimizer_G = torch.optim.Adam(generator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    optimizer_D = torch.optim.Adam(discriminator.parameters(), lr=1e-3, betas=(0.5, 0.999))
    z_handed = Handoff("z")

    def d_loss(batch):
        real_imgs = batch[0]
        z = torch.randn(real_imgs.shape[0], LATENT)
        z_handed.put(z)  # the G step of this batch draws from the same z
        fake_imgs = generator(z)
        real_validity = discriminator(real_imgs)
        fake_validity = discriminator(fake_imgs)
        gradient_penalty = compute_gradient_penalty(discriminator, real_imgs.data, fake_imgs.data)
        return -torch.mean(real_validity) + torch.mean(fake_validity) + LAMBDA_GP * gradient_penalty

    def g_loss(batch):
        return -torch.mean(discriminator(generator(z_handed.take())))

    # i % n_critic == 0: D then G on batch 0, D alone on batches 1..4, D then G on batch 5...
    flow = Flow([
        Step(d_loss, optimizer_D, name="D"),
        Step(g_loss, optimizer_G, name="G", batch="same"),
        Step(d_loss, optimizer_D, name="D_more", repeat=N_CRITIC - 1),
    ], restart=restart)
    trainer = Trainer({"G": generator, "D": discriminator}, flow, device="cpu")
    torch.manual_seed(7)
    if epochs:  # epochs=0: built only, to load a state into
        trainer.fit(data, epochs=epochs, **fit)
    return generator, discriminator, trainer


def test_wgan_gp_with_a_cycle_that_restarts_every_epoch_equals_pytorch_gans_loop():
    data = images(9)  # not a multiple of n_critic: the cycle position matters at every epoch start
    before = gan_nets()[0].state_dict()
    hand_g, hand_d = wgan_gp_by_hand(data, epochs=3)
    g, d, trainer = wgan_gp_declarative(data, epochs=3)
    assert_changed(before, g)
    assert_same_weights(hand_g, g)
    assert_same_weights(hand_d, d)
    assert trainer.updates == 3 * (9 + 2)  # 9 critic updates and 2 generator updates per epoch


def test_without_restart_the_cycle_carries_across_epochs_and_the_port_differs():
    data = images(9)
    hand_g, _ = wgan_gp_by_hand(data, epochs=2)
    g, _, trainer = wgan_gp_declarative(data, epochs=2, restart="never")
    assert not all(torch.equal(a, b) for a, b in zip(hand_g.parameters(), g.parameters()))
    # epoch 1 ended inside the cycle (after the 3rd of 4 D_more): epoch 2 runs G after batches 1 and 6, not 0 and 5
    assert trainer.updates == 2 * (9 + 2) and trainer.flow.position == 4


def test_a_restarting_flow_resumes_mid_epoch_exactly():
    data = images(9)
    g_full, d_full, _ = wgan_gp_declarative(data, epochs=2)
    _, _, first = wgan_gp_declarative(data, epochs=2, max_updates=15)  # in epoch 2: D, G, then D_more on batches 1, 2
    state = first.state_dict()
    assert state["flow"] == {"position": 4, "cycle": ["D", "G", "D_more", "D_more", "D_more", "D_more"],
                             "restart": "epoch"}
    g, d, resumed = wgan_gp_declarative(data, epochs=0)  # built the same way, nothing trained yet
    resumed.load_state_dict(state)
    resumed.fit(data, epochs=2)
    assert_same_weights(g_full, g)
    assert_same_weights(d_full, d)


def test_flow_errors_name_the_argument():
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=r"Flow: `restart` must be 'never' or 'epoch'\. Received: restart='batch'\. "
                                         r"Pass restart='epoch'"):
        Flow([Step(lambda b: b, opt)], restart="batch")
    never = Flow([Step(lambda b: b, opt, name="a")]).state_dict()
    with pytest.raises(ValueError, match=r"Flow state was saved with restart='never', but this flow has "
                                         r"restart='epoch'.*Build the flow as the saved run did"):
        Flow([Step(lambda b: b, opt, name="a")], restart="epoch").load_state_dict(never)


# ------------------------------------------------------------------------------ pytorch/examples' DCGAN


def dcgan_nets():
    generator, discriminator = gan_nets(seed=3)
    return generator, nn.Sequential(discriminator, nn.Sigmoid())


def dcgan_by_hand(data, epochs: int):
    """pytorch/examples dcgan/main.py's loop: G scores D's `fake` again (and its graph)."""
    netG, netD = dcgan_nets()
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-3, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-3, betas=(0.5, 0.999))
    real_label, fake_label = 1.0, 0.0
    torch.manual_seed(11)
    for _ in range(epochs):
        for data_i in data:
            netD.zero_grad()
            real_cpu = data_i[0]
            batch_size = real_cpu.size(0)
            label = torch.full((batch_size,), real_label)
            output = netD(real_cpu).view(-1)
            errD_real = criterion(output, label)
            errD_real.backward()
            noise = torch.randn(batch_size, LATENT)
            fake = netG(noise)
            label.fill_(fake_label)
            output = netD(fake.detach()).view(-1)
            errD_fake = criterion(output, label)
            errD_fake.backward()
            optimizerD.step()
            netG.zero_grad()
            label.fill_(real_label)
            output = netD(fake).view(-1)
            errG = criterion(output, label)
            errG.backward()
            optimizerG.step()
    return netG, netD


def dcgan_declarative(data, epochs: int):
    netG, netD = dcgan_nets()
    criterion = nn.BCELoss()
    optimizerD = torch.optim.Adam(netD.parameters(), lr=2e-3, betas=(0.5, 0.999))
    optimizerG = torch.optim.Adam(netG.parameters(), lr=2e-3, betas=(0.5, 0.999))
    fake_handed = Handoff("fake")

    def loss_D(batch):
        real = batch[0]
        fake = netG(torch.randn(real.size(0), LATENT))
        fake_handed.put(fake)  # G scores this very fake, through its graph
        ones, zeros = torch.ones(real.size(0)), torch.zeros(real.size(0))
        return {"real": criterion(netD(real).view(-1), ones), "fake": criterion(netD(fake.detach()).view(-1), zeros)}

    def loss_G(batch):
        fake = fake_handed.take()
        return criterion(netD(fake).view(-1), torch.ones(fake.size(0)))

    trainer = Trainer(
        {"G": netG, "D": netD},
        [Step(loss_D, optimizerD, name="D"), Step(loss_G, optimizerG, name="G", batch="same")],
        device="cpu",
    )
    torch.manual_seed(11)
    trainer.fit(data, epochs=epochs)
    return netG, netD, trainer


def test_dcgan_handing_fake_to_the_g_step_equals_pytorch_examples_loop():
    data = images(4)
    before = dcgan_nets()[0].state_dict()
    hand_g, hand_d = dcgan_by_hand(data, epochs=2)
    g, d, trainer = dcgan_declarative(data, epochs=2)
    assert_changed(before, g)
    assert_same_weights(hand_g, g)
    assert_same_weights(hand_d, d)
    assert sorted(trainer.logs) == ["D/fake", "D/real", "G/loss"]


def test_a_stale_handed_value_is_an_error_naming_it():
    netG, netD = dcgan_nets()
    optimizerD = torch.optim.Adam(netD.parameters())
    optimizerG = torch.optim.Adam(netG.parameters())
    fake = Handoff("fake")

    def loss_D(batch):
        fake.put(netG(torch.randn(len(batch[0]), LATENT)))
        return netD(batch[0]).mean()

    def loss_G(batch):
        return -netD(fake.take()).mean()

    # G twice per cycle: its second update would reuse the fake of the first (from the D update before)
    trainer = Trainer({"G": netG, "D": netD}, [Step(loss_D, optimizerD, name="D"),
                                               Step(loss_G, optimizerG, name="G", batch="same", repeat=2)])
    with pytest.raises(ValueError, match=r"Handoff 'fake': take\(\) found no value put since the previous take\(\): "
                                         r"it would be stale, from an earlier cycle\. Received: 1 put\(s\), 2 take\(s\)"):
        trainer.fit(images(3), epochs=1)
    with pytest.raises(TypeError, match=r"Handoff: `name` must be a non-empty string\. Received: name=3"):
        Handoff(3)
