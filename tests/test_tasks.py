import numpy as np

from multitask.config import face_heads
from multitask.tasks import cut, encode_joint, joint_class_names, joint_probabilities


def test_the_18_classes_follow_the_competition_code():
    sizes = [len(h.classes) for h in face_heads()]
    assert sizes == [3, 2, 3]
    names = joint_class_names(face_heads())
    for mask in range(3):
        for gender in range(2):
            for age in range(3):
                code = encode_joint([np.array([mask]), np.array([gender]), np.array([age])], sizes)[0]
                assert code == 6 * mask + 3 * gender + age
                assert names[code] == "/".join([face_heads()[0].classes[mask], face_heads()[1].classes[gender],
                                                face_heads()[2].classes[age]])


def test_joint_names_are_in_code_order():
    names = joint_class_names(face_heads())
    assert len(names) == 18
    assert names[0] == "worn/male/<30"
    assert names[6 * 1 + 3 * 1 + 2] == "incorrect/female/60+"
    assert names[17] == "not_worn/female/60+"


def test_joint_probability_is_the_product_of_head_probabilities():
    rng = np.random.default_rng(0)
    probs = [rng.dirichlet(np.ones(n), size=5) for n in (3, 2, 3)]
    joint = joint_probabilities(probs)
    assert joint.shape == (5, 18)
    np.testing.assert_allclose(joint.sum(1), 1.0)
    m, g, a = 2, 1, 0
    np.testing.assert_allclose(joint[:, 6 * m + 3 * g + a], probs[0][:, m] * probs[1][:, g] * probs[2][:, a])


def test_age_groups_use_the_thresholds():
    assert cut([0, 29, 30, 59, 60, 99], (30, 60)).tolist() == [0, 0, 1, 1, 2, 2]
    assert cut([57, 58, 59], (30, 58)).tolist() == [1, 2, 2]
