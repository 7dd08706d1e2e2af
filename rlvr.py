"""
rlvr.py: the decision stage of Vision-Zero, RL with verifiable rewards (paper Sec. 3.3).

Every iteration plays a batch of full games (selfplay.py) and trains the shared policy on the
decision samples only: the judge's G samples per game (default) or the civilians' votes. Whether
a vote names the spy is verifiable from the game itself: no label from outside.

  Eq. 4  decision reward: +1 for the spy's seat, -0.5 for N/A, -1 for a wrong seat or an
         unparsable answer. (--decision-reward shaped: the released code's
         0.3 (2 fmt - 1) + 1.2 acc + 0.99 [acc > 0], acc = Eq. 4's reward, fmt = reasoning
         before the box longer than 10 characters and a non-empty answer.)
  Eq. 5  group advantages: A_i = (r_i - mean) / (std + 1e-8) over one game's samples (population
         std); a group whose rewards are all equal gets zero advantages.
  Eq. 6  the clipped surrogate + k3 KL loss on the decision tokens: trainer.policy_loss.

Run it through Iterative-SPO (`bash run.sh`), or alone for the RLVR-only ablation:

    python rlvr.py --model tiny-vlm --data games/clevr --out runs/decision --schedule decision --iterations 20

It trains until trainer.py's switching rule hands over to the clue stage (spo.py) or the
iteration budget is spent, saves everything to --out, and exits.
"""
import selfplay


def decision_reward(vote, spy):
    """Eq. 4: vote is a 0-based seat, "N/A" or None (invalid)."""
    if vote == "N/A":
        return -0.5
    return 1.0 if vote == spy else -1.0


def shaped_decision_reward(turn, spy):
    """The released code's reward: r = 0.3 (2 fmt - 1) + 1.2 acc + 0.99 [acc > 0], acc = Eq. 4's
    +1 / -0.5 / -1 (right / N/A / wrong or invalid), fmt = reasoning before the box longer than
    10 characters and a non-empty answer. Right 2.49 (1.89 without the format), N/A -0.30
    (-0.90), wrong -0.90 (-1.50)."""
    accuracy = decision_reward(turn.parsed, spy)
    answer = selfplay.first_boxed(turn.text)
    well_formed = float(bool(answer and answer.strip()) and len(turn.reasoning) > 10)
    return 0.3 * (2 * well_formed - 1) + 1.2 * accuracy + 0.99 * (accuracy > 0)


def group_std(rewards):
    """The population std of one group's rewards (Eq. 5); exactly 0 when they are all equal."""
    if max(rewards) == min(rewards):
        return 0.0
    mean = sum(rewards) / len(rewards)
    return (sum((r - mean) ** 2 for r in rewards) / len(rewards)) ** 0.5


def group_advantages(rewards):
    """Eq. 5: rewards standardised within one group; exactly 0 for a group of equal rewards (their
    float mean can differ from each of them by a rounding error, which / 1e-8 would turn into
    advantages of ~1e-9 to 1e-8)."""
    mean, std = sum(rewards) / len(rewards), group_std(rewards)
    if std == 0.0:
        return [0.0] * len(rewards)
    return [(r - mean) / (std + 1e-8) for r in rewards]


def reward_spread(games):
    """How much the decision groups of a batch can teach (TRL's names): frac_reward_zero_std, the
    share of games whose decision rewards are all equal (all advantages 0: no signal), and
    reward_std, the mean of the groups' stds."""
    stds = [group_std([t.reward for t in game.decisions]) for game in games]
    return {"frac_reward_zero_std": sum(s == 0.0 for s in stds) / len(stds), "reward_std": sum(stds) / len(stds)}


def score_decisions(games, cfg):
    """Eq. 4 (or the shaped reward) for every decision sample: sets turn.reward."""
    for game in games:
        for turn in game.decisions:
            turn.reward = (shaped_decision_reward(turn, game.spy) if cfg.decision_reward == "shaped"
                           else decision_reward(turn.parsed, game.spy))


def decision_samples(games, cfg):
    """The decision stage's training batch: every decision sample with its advantage within its
    game's group (Eq. 5). Sets turn.advantage."""
    turns, advantages = [], []
    for game in games:
        for turn, advantage in zip(game.decisions, group_advantages([t.reward for t in game.decisions])):
            turn.advantage = advantage
            turns.append(turn)
            advantages.append(advantage)
    return turns, advantages


if __name__ == "__main__":
    import sys

    import spo
    import trainer
    trainer.main("decision", clue_stage=spo, decision_stage=sys.modules[__name__])
