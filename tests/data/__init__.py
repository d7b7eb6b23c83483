"""Tests of vembed.data: records, splits, images, mining, data-set builders."""
